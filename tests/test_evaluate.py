import json
import re

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from unified_tte.eval import evaluate as evaluate_mod
from unified_tte.data import DataError, EvalRow, EvalTask, resolve_tasks
from unified_tte.data.digits import WORDS, teacher_trace
from unified_tte.eval.evaluate import candidate_key, eval_main, evaluate_model, format_table
from unified_tte.eval.metrics import evaluate_scores
from unified_tte.model.inputs import Trace, TTEInput

LABELS = load_digits().target
SUB_OF_INSTRUCTION = {
    "Which digit": "classify", "two more": "plus_two", "Double the digit": "double_last",
    "same digit": "same_digit"}


def one_hot(v, dim=20):
    e = torch.zeros(dim)
    e[v] = 1.0
    return e


class DigitsOracle:
    """A fake model that "sees" digits perfectly: an image embeds as its label, a number word as
    its value. Without a trace a query embeds as what it shows (no reasoning); `think` writes the
    teacher's trace and the embedding follows its answer, so reasoning tasks need thinking."""

    def __init__(self):
        self.embedded = []          # every input passed to embed, in order
        self.thought = 0

    def _value(self, x):
        if x.images:
            return int(LABELS[x.images[0].info["digits_index"]])
        words = [w.strip(".,") for w in x.text.split()]
        return [WORDS.index(w) for w in words if w in WORDS][-1]   # the last number named

    def embed(self, inputs, traces=None):
        self.embedded += list(inputs)
        vals = [self._value(x) if t is None else WORDS.index(t.split()[-1])
                for x, t in zip(inputs, traces or [None] * len(inputs))]
        return torch.stack([one_hot(v) for v in vals])

    def think_then_embed(self, inputs, max_new_tokens=128):
        self.thought += len(inputs)
        traces = []
        for x in inputs:
            if x.images:
                sub = next(s for k, s in SUB_OF_INSTRUCTION.items() if k in x.text)
                t = teacher_trace(sub, self._value(x))
            else:
                t = teacher_trace("next_number", self._value(x))
            traces.append(Trace(t, [], True))
        emb = torch.stack([one_hot(WORDS.index(t.text.split()[-1])) for t in traces])
        return emb, traces


@pytest.fixture(scope="module")
def digits_tasks():
    return resolve_tasks("digits", max_rows=30)


def test_thinking_oracle_solves_every_digits_task(digits_tasks):
    res = evaluate_model(DigitsOracle(), digits_tasks, batch_size=7, progress=False)
    for name, m in res["tasks"].items():
        assert (m["hit@1"], m["ndcg@5"], m["mrr"]) == (1.0, 1.0, 1.0), name
        assert m["n"] == 30 and m["n_candidates"] == 10 and m["trace_valid"] == 1.0
    assert res["overall"]["hit@1"] == 1.0 and res["overall"]["n_tasks"] == 5
    assert set(res["groups"]) == {"I2T", "T2I", "I2I"}
    assert res["tasks"]["digits/plus_two"]["examples"][0]["trace"].startswith("<think>")


def test_without_thinking_only_the_no_reasoning_tasks_are_solved(digits_tasks):
    model = DigitsOracle()
    res = evaluate_model(model, digits_tasks, use_think=False, progress=False)
    assert model.thought == 0
    t = res["tasks"]
    assert t["digits/classify"]["hit@1"] == 1.0 and t["digits/same_digit"]["hit@1"] == 1.0
    assert t["digits/plus_two"]["hit@1"] == 0.0
    assert t["digits/next_number"]["hit@1"] == 0.0        # embeds the named digit, not the next
    rows = next(x for x in digits_tasks if x.name == "digits/double_last").rows
    zeros = sum(r.meta["digit"] == 0 for r in rows) / len(rows)   # 2*0 ends in 0: right anyway
    assert t["digits/double_last"]["hit@1"] == pytest.approx(zeros)
    assert "trace_valid" not in t["digits/classify"]


def test_each_distinct_candidate_is_embedded_once_per_task(digits_tasks):
    model = DigitsOracle()
    by_name = {t.name: t for t in digits_tasks}
    res = evaluate_model(model, [by_name["digits/plus_two"]], use_think=False, progress=False)
    assert res["tasks"]["digits/plus_two"]["n_distinct_candidates"] == 10
    assert len(model.embedded) == 30 + 10                  # queries + the ten number texts


def test_given_traces_replace_decoding_and_a_memo_embeds_candidates_once_across_evaluations(digits_tasks):
    from unified_tte.eval.cache import MemoryCache

    model, memo = DigitsOracle(), MemoryCache()
    own = evaluate_model(model, digits_tasks, progress=False, candidate_memo=memo, keep_traces=True)
    traces = {rid: t for m in own["tasks"].values() for rid, t in m.pop("traces").items()}
    assert len(traces) == 5 * 30 and model.thought == 5 * 30
    embedded = len(model.embedded)
    given = evaluate_model(model, digits_tasks, progress=False, candidate_memo=memo, traces=traces)
    assert model.thought == 5 * 30                         # nothing decoded: the traces were given
    assert len(model.embedded) - embedded == 5 * 30        # only the queries: candidates came from the memo
    for name, m in given["tasks"].items():
        assert m["hit@1"] == own["tasks"][name]["hit@1"] == 1.0 and "traces" not in m
    wrong = {rid: "<think>no</think> zero" for rid in traces}
    assert evaluate_model(model, digits_tasks, progress=False, traces=wrong)["overall"]["hit@1"] < 0.5
    with pytest.raises(DataError, match="no given trace for 30 queries"):
        evaluate_model(model, digits_tasks[:1], progress=False, traces={})


def test_candidate_key_dedupes_equal_pixels_and_paths_not_objects(tmp_path):
    a, b = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "red")
    c = Image.new("RGB", (4, 4), "blue")
    memo = {}
    assert candidate_key(TTEInput("x", [a]), memo) == candidate_key(TTEInput("x", [b]), memo)
    assert candidate_key(TTEInput("x", [a]), memo) != candidate_key(TTEInput("x", [c]), memo)
    assert candidate_key(TTEInput("x", [a]), memo) != candidate_key(TTEInput("y", [a]), memo)
    # Equal paths held in two different string objects (one object twice would also match a key
    # taken from the object's identity), and another path keys differently.
    p, same_path = str(tmp_path / "i.png"), str(tmp_path / "i.png")
    assert p is not same_path
    assert candidate_key(TTEInput("", [p]), memo) == candidate_key(TTEInput("", [same_path]), memo)
    assert candidate_key(TTEInput("", [p]), memo) != candidate_key(TTEInput("", [str(tmp_path / "j.png")]), memo)


class TableEmbedder:
    """Embeds by a fixed text -> vector table, so scores are chosen by hand."""

    def __init__(self, table):
        self.table = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float), dim=0)
                      for k, v in table.items()}

    def embed(self, inputs, traces=None):
        return torch.stack([self.table[x.text] for x in inputs])


def test_cosine_scores_give_hand_computed_metrics():
    model = TableEmbedder({"q1": [1, 0], "q2": [0, 1], "a": [1, 0], "b": [1, 1], "c": [0, 1]})
    cands = [TTEInput("a"), TTEInput("b"), TTEInput("c")]
    # q1 scores a=1, b=.707, c=0; q2 scores a=0, b=.707, c=1.
    task = EvalTask("t", "T2T", [EvalRow("r1", TTEInput("q1"), cands, 1),   # rank 2
                                 EvalRow("r2", TTEInput("q2"), cands, 2)])  # rank 1
    m = evaluate_model(model, [task], use_think=False, progress=False)["tasks"]["t"]
    assert m["hit@1"] == 0.5
    assert m["mrr"] == pytest.approx((0.5 + 1) / 2)
    assert m["ndcg@5"] == pytest.approx((1 / 1.5849625 + 1) / 2, rel=1e-6)


class LevelEmbedder:
    """Embeds a text by its first word: "top" 1.0, "mid" 0.6 and "low" 0.0 along the queries'
    direction, so scores repeat exactly and ties are chosen by hand; a query is "q ...". The
    second axis keeps every vector unit length."""

    LEVELS = {"q": 1.0, "top": 1.0, "mid": 0.6, "low": 0.0}

    def embed(self, inputs, traces=None):
        rows = []
        for x in inputs:
            a = self.LEVELS[x.text.split()[0]]
            rows.append([a, (1 - a * a) ** 0.5])
        return torch.tensor(rows, dtype=torch.float32)


def test_both_scorers_give_the_same_numbers_on_duplicates_ties_and_graded_qrels():
    def c(text):
        return TTEInput(text)
    rows = [EvalRow("dup", c("q 1"), [c("mid a"), c("low b"), c("mid a"), c("low c")], 2),   # the positive, twice
            EvalRow("tie", c("q 2"), [c("mid a"), c("mid b"), c("low b"), c("mid b")], 0),   # ties "mid b" (twice)
            EvalRow("clear", c("q 3"), [c("top a"), c("mid a"), c("low c")], 0)]
    lists = EvalTask("lists", "T2T", rows)
    corpus = {"p1": c("mid page"), "p2": c("mid other"), "p3": c("top page"), "p4": c("low page"), "p5": c("mid page")}
    graded = EvalTask("graded", "T2T", [EvalRow("g1", c("q 4"), [], relevance={"p5": 3.0, "p2": 1.0}),   # p5 == p1
                                        EvalRow("g2", c("q 5"), [], relevance={"p4": 2.0, "p3": 1.0})], corpus=corpus)
    model = LevelEmbedder()

    def scores(texts, query):
        return (model.embed([c(t) for t in texts]) @ model.embed([query])[0]).numpy()

    for rule in ("pessimistic", "reference"):
        res = evaluate_model(model, [lists, graded], use_think=False, progress=False, tie_rule=rule)["tasks"]
        texts = [[x.text for x in r.candidates] for r in rows]
        want = evaluate_scores([scores(t, r.query) for t, r in zip(texts, rows)], [r.positive for r in rows],
                               candidates=texts, tie_rule=rule)
        # the corpus columns in VLM2Vec's candidate order: the rows' relevant pages, then the rest
        ids = list(dict.fromkeys(["p5", "p2", "p4", "p3"] + list(corpus)))
        pages = [corpus[i].text for i in ids]
        want_graded = evaluate_scores([scores(pages, r.query) for r in graded.rows],
                                      [{ids.index(i): g for i, g in r.relevance.items()} for r in graded.rows],
                                      candidates=[pages] * 2, tie_rule=rule)
        for got, expected in ((res["lists"], want), (res["graded"], want_graded)):
            assert {k: got[k] for k in expected if k != "tied_queries"} == pytest.approx(
                {k: v for k, v in expected.items() if k != "tied_queries"}), rule
        assert res["lists"]["n_tied"] == 1 and res["graded"]["n_tied"] == 1      # "tie" and g1 (p5 vs p2)
    # the rules part where the tie is: pessimistic ranks "tie"'s positive behind both copies of "mid b"
    assert evaluate_model(model, [lists], use_think=False, progress=False)["tasks"]["lists"]["hit@1"] == 2 / 3


def test_the_reference_rule_ranks_a_corpus_in_vlm2vecs_candidate_order():
    flat = TableEmbedder({"q1": [1, 0], "q2": [1, 0], "a": [1, 0], "b": [1, 0], "c": [1, 0]})
    corpus = {"c1": TTEInput("a"), "c2": TTEInput("b"), "c3": TTEInput("c")}
    task = EvalTask("t", "T2T", [EvalRow("r1", TTEInput("q1"), [], relevance={"c3": 1.0}),
                                 EvalRow("r2", TTEInput("q2"), [], relevance={"c1": 1.0})], corpus=corpus)
    m = evaluate_model(flat, [task], use_think=False, progress=False, tie_rule="reference")["tasks"]["t"]
    # candidates c3, c1 (the rows' relevant items, in row order), then c2: r1 ranks 1st, r2 2nd
    assert m["mrr"] == pytest.approx((1 + 1 / 2) / 2) and m["n_tied"] == 2


def write_v1_task(folder):
    """An MMEB-eval V1 file (positive first) whose scores tie a lot under LevelEmbedder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lists = [["mid a", "mid b", "mid c", "low d"]] * 5 + [["mid a", "top b", "low c"], ["top a", "mid b", "mid c"],
                                                          ["low a", "mid b"]]
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"qry_text": f"q {i}", "qry_img_path": "", "tgt_text": texts,
                                          "tgt_img_path": [""] * len(texts)} for i, texts in enumerate(lists)]),
                   folder / "test-00000-of-00001.parquet")
    return lists


def test_tie_rule_reference_reproduces_mmeb_v1s_argmax_and_results_json_counts_the_ties(tmp_path, monkeypatch, capsys):
    import numpy as np

    lists = write_v1_task(tmp_path / "Tied")
    (tmp_path / "tasks.yaml").write_text("Tied:\n  path: Tied\n  group: classification\n")
    model = LevelEmbedder()
    monkeypatch.setattr(evaluate_mod, "_load_model", lambda *a, **k: model)
    # MMEB-V1's rule from its definition: a hit when np.argmax (the first of equal maxima) is 0
    q = model.embed([TTEInput("q 0")])[0].numpy()
    v1 = np.mean([int(np.argmax(model.embed([TTEInput(t) for t in texts]).numpy() @ q)) == 0 for texts in lists])
    got = {}
    for rule in ("reference", "pessimistic"):
        out = tmp_path / f"{rule}.json"
        assert eval_main(["ckpt", "--tasks", str(tmp_path / "tasks.yaml"), "--no-think", "--no-progress",
                          "--tie-rule", rule, "--out", str(out)]) == 0
        got[rule] = json.loads(out.read_text())
        assert got[rule]["settings"]["tie_rule"] == rule and got[rule]["tasks"]["Tied"]["n_tied"] == 5
    assert v1 == 0.75 and got["reference"]["tasks"]["Tied"]["hit@1"] == v1
    assert got["pessimistic"]["tasks"]["Tied"]["hit@1"] == 1 / 8
    assert "5 queries in 1 task(s) (Tied 5)" in capsys.readouterr().out


def test_eval_main_refuses_a_bogus_tie_rule_and_a_missing_label_set_in_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_mod, "_load_model", lambda *a, **k: pytest.fail("model loaded for bad input"))
    assert eval_main(["ckpt", "--tie-rule", "bogus", "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"tte eval: error: argument --tie-rule: invalid choice: 'bogus' "
                        r"\(choose from '?pessimistic'?, '?reference'?\)", last), last   # quotes: by Python version
    (tmp_path / "tasks.yaml").write_text("K700:\n  path: k700\n  labels: k700_labels.txt\n")
    assert eval_main(["ckpt", "--tasks", str(tmp_path / "tasks.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tte eval: error: {tmp_path / 'tasks.yaml'} task 'K700': field 'labels': "
                                               f"label-set file {tmp_path / 'k700_labels.txt'} not found"), err
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "Nulls").mkdir()
    pq.write_table(pa.Table.from_pylist([{"qry_text": "q 0", "qry_img_path": "", "tgt_text": ["top a", None],
                                          "tgt_img_path": ["", ""]}]), tmp_path / "Nulls" / "test.parquet")
    (tmp_path / "tasks.yaml").write_text("Nulls:\n  path: Nulls/test.parquet\n")
    assert eval_main(["ckpt", "--tasks", str(tmp_path / "tasks.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tte eval: error: {tmp_path / 'Nulls' / 'test.parquet'} row 0: task 'Nulls' row 'test:0': field "
                   "'tgt_text[1]' is null and 'tgt_img_path[1]' names no image, so candidate 1 has no content; give "
                   "it a text or an image, or drop it from both lists."], err


def test_bad_task_is_rejected_before_the_model_runs():
    class Boom:
        def embed(self, *a, **k):
            raise AssertionError("model must not run")
    task = EvalTask("broken", "T2T", [EvalRow("r9", TTEInput("q"), [], 0)])
    with pytest.raises(DataError, match="task 'broken' row 'r9': empty candidate list"):
        evaluate_model(Boom(), [task], use_think=False, progress=False)


def test_format_table_shows_percentages_with_one_decimal_and_group_rows(digits_tasks):
    res = evaluate_model(DigitsOracle(), digits_tasks[:2], use_think=False, progress=False)
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0] == "| task | group | reasoning | queries | Hit@1 | NDCG@5 | MRR |"
    assert "| digits/classify | I2T | no | 30 | 100.0 | 100.0 | 100.0 |" in lines
    assert any(l.startswith("| **I2T** avg") and "2 tasks" in l for l in lines)
    assert lines[-3].startswith("| **overall** avg")
    # without a trace, plus_two's queries score every number word 0: the table says who decided
    assert res["tasks"]["digits/plus_two"]["n_tied"] == 30 and res["tasks"]["digits/classify"]["n_tied"] == 0
    assert lines[-1] == ("Exact ties involving a positive, ranked by the pessimistic tie rule (--tie-rule): "
                         "30 queries in 1 task(s) (digits/plus_two 30).")
    numbers = re.findall(r"\| (\d+\.\d+)", table)
    assert numbers and all(re.fullmatch(r"\d+\.\d", n) for n in numbers)


def test_eval_main_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys):
    loaded = []

    def fake_load(path, backbone=None):
        loaded.append((path, backbone))
        return DigitsOracle()
    monkeypatch.setattr(evaluate_mod, "_load_model", fake_load)
    out = tmp_path / "res" / "results.json"
    rc = eval_main(["ckpt_dir", "--tasks", "digits/plus_two,digits/classify", "--out", str(out),
                    "--max-queries", "12", "--no-progress"])
    assert rc == 0 and loaded == [("ckpt_dir", None)]
    printed = capsys.readouterr().out
    assert "| digits/plus_two | I2T | yes | 12 | 100.0 | 100.0 | 100.0 | 100.0 |" in printed
    res = json.loads(out.read_text())
    assert res["checkpoint"] == "ckpt_dir" and res["settings"]["use_think"] is True
    assert list(res["tasks"]) == ["digits/plus_two", "digits/classify"]
    assert res["overall"]["hit@1"] == 1.0


def test_eval_main_reports_an_unknown_task_without_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(evaluate_mod, "_load_model",
                        lambda *a, **k: pytest.fail("model loaded for a bad task list"))
    assert eval_main(["ckpt", "--tasks", "nope", "--no-progress"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err



def test_eval_main_loads_a_training_run_folder(tmp_path, capsys, monkeypatch):
    """`tte eval RUN_DIR`: the run's adapters on its recorded backbone, through the loader that
    export uses; the resume checkpoints DeepSpeed leaves in the run are not touched."""
    from unified_tte import UnifiedTTE
    from unified_tte.model import adapters
    from unified_tte.model.zoo import tiny_qwen2vl
    from unified_tte.testing import randomize_adapters, solid_image

    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    # Trained weights: a fresh LoRA (B = 0, A from the config seed) is what a loader that skipped
    # the run's adapters would build too.
    randomize_adapters(tte, std=0.1, seed=5)
    loaded = []
    real_load = evaluate_mod._load_model   # a spy: the real loader runs
    monkeypatch.setattr(evaluate_mod, "_load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    run = tmp_path / "run"
    for name in tte.embed_adapters:
        adapters.save_adapter(tte.peft_model, name, run / name)
    (run / "tte_config.json").write_text(json.dumps({**tte.config.to_dict(), "backbone": "tiny"}))
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed state")
    out = tmp_path / "results.json"
    rc = eval_main([str(run), "--tasks", "digits/classify", "--max-queries", "4", "--max-new-tokens", "4",
                    "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| digits/classify | I2T | no | 4 |" in captured.out
    assert json.loads(out.read_text())["tasks"]["digits/classify"]["n"] == 4
    (model,) = loaded
    x, traces = [TTEInput("Which digit?", [solid_image(56, 56)]), TTEInput("seven")], ["<think>a</think> b"] * 2
    assert torch.equal(model.embed(x, traces), tte.embed(x, traces))
