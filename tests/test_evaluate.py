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
    assert lines[-1].startswith("| **overall** avg")
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
