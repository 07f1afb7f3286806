import json
from types import SimpleNamespace

import pytest
from PIL import Image

from unified_tte import tracegen
from unified_tte.data import DataError, EvalRow, TrainRow, load_traces
from unified_tte.model.inputs import TTEInput, Trace
from unified_tte.data.traces import ECR_PROMPTS, check_ecr_shape, ecr_input, ecr_prompt, normalize_trace, swap_answers
from unified_tte.tracegen import generate_traces, traces_main


class FakeReasoner:
    """`think` answers each input with a canned trace naming the input's text; it records the
    inputs it saw and can crash on a given call to simulate a killed run."""

    def __init__(self, crash_on_call=None, bad_when=lambda text: False):
        self.calls, self.seen = 0, []
        self.crash_on_call, self.bad_when = crash_on_call, bad_when

    def think(self, inputs, max_new_tokens=128, do_sample=False):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise KeyboardInterrupt("killed")
        self.seen += [x.text for x in inputs]
        out = []
        for x in inputs:
            q = x.text.split("\n")[0]
            text = "no tags at all" if self.bad_when(q) else f"<think>About {q}.</think> {q}"
            out.append(Trace(text=text, token_ids=[1, 2], finished=True))
        return SimpleNamespace(traces=out)


def _rows(n, task="ImageNet_1K"):
    return [TrainRow(f"r{i}", TTEInput(f"q{i}"), TTEInput(f"p{i}"), task=task) for i in range(n)]


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _ids(path):
    return [r["id"] for r in _lines(path)]


# ----------------------------------------------------------------------------- shape

@pytest.mark.parametrize("trace", [
    "<think>The image shows a 3. Three plus two is five.</think> five",
    "  <think>multi\nline</think>\n a cat on a sofa ",
])
def test_ecr_shape_accepts_think_then_short_answer(trace):
    assert check_ecr_shape(trace)


@pytest.mark.parametrize("trace", [
    "five",                                          # no think block
    "<think>reasoning</think>",                      # no answer
    "<think>reasoning</think>   ",                   # blank answer
    "<think> </think> five",                         # empty reasoning
    "<think>a</think> b <think>c</think> d",         # a second block
    "<think>a <think>b</think> c",                   # nested
    "<think>unclosed five",                          # truncated at max_new_tokens
    "<think>a</think> " + "word " * 17,              # answer too long
    "preamble <think>a</think> b",                   # text before the block
])
def test_ecr_shape_rejects_malformed_traces(trace):
    assert not check_ecr_shape(trace)


def test_normalize_restores_an_opening_tag_supplied_by_the_prompt():
    assert normalize_trace(" reasoning</think> five\n") == "<think>reasoning</think> five"
    assert normalize_trace("<think>a</think> b") == "<think>a</think> b"
    assert normalize_trace("no tags") == "no tags"


def test_prompts_cover_mmeb_types_and_digits_subtasks():
    for t in ["classification", "retrieval", "qa", "grounding", "digits/classify",
              "digits/plus_two", "digits/double_last", "digits/next_number", "digits/same_digit"]:
        assert "<think>" in ECR_PROMPTS[t]
    assert ecr_prompt("ImageNet_1K") == ECR_PROMPTS["classification"]
    assert ecr_prompt("OK-VQA") == ECR_PROMPTS["qa"]
    assert ecr_prompt("some_user_task") == ECR_PROMPTS["retrieval"]
    img = Image.new("RGB", (4, 4))
    x = ecr_input(TTEInput("What is shown?", [img]), "digits/plus_two")
    assert x.images == [img]
    assert x.text == "What is shown?\n\n" + ECR_PROMPTS["digits/plus_two"]


# ----------------------------------------------------------------------------- generation

def test_writes_one_row_per_id_in_batches_with_the_task_prompt(tmp_path):
    out = tmp_path / "t.jsonl"
    r = FakeReasoner()
    stats = generate_traces(r, _rows(10), out, batch_size=4, progress=False)
    assert r.calls == 3
    assert _lines(out)[0] == {"id": "r0", "trace": "<think>About q0.</think> q0", "valid": True,
                              "gen": {"model": None, "max_new_tokens": 128, "do_sample": False, "prompt": "ecr",
                                      "task_type": None, "pixels": [None, None]}}
    assert _ids(out) == [f"r{i}" for i in range(10)]
    assert r.seen[0] == "q0\n\n" + ECR_PROMPTS["classification"]
    assert (stats.written, stats.skipped_existing, stats.invalid, stats.total) == (10, 0, 0, 10)


def test_use_prompt_false_sends_the_bare_query(tmp_path):
    r = FakeReasoner()
    generate_traces(r, _rows(2), tmp_path / "t.jsonl", use_prompt=False, progress=False)
    assert r.seen == ["q0", "q1"]


def test_resume_after_a_limit_adds_only_the_rest_and_each_id_once(tmp_path):
    out = tmp_path / "t.jsonl"
    first = FakeReasoner()
    generate_traces(first, _rows(10), out, batch_size=3, limit=4, progress=False)
    assert _ids(out) == ["r0", "r1", "r2", "r3"]
    second = FakeReasoner()
    stats = generate_traces(second, _rows(10), out, batch_size=3, progress=False)
    assert [s.split("\n")[0] for s in second.seen] == [f"q{i}" for i in range(4, 10)]
    assert stats.skipped_existing == 4 and stats.written == 6
    assert sorted(_ids(out), key=lambda s: int(s[1:])) == [f"r{i}" for i in range(10)]
    assert len(set(_ids(out))) == 10
    third = FakeReasoner()
    assert generate_traces(third, _rows(10), out, progress=False).written == 0
    assert third.calls == 0


def test_resume_after_a_crash_mid_run_keeps_finished_batches(tmp_path):
    out = tmp_path / "t.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_traces(FakeReasoner(crash_on_call=3), _rows(10), out, batch_size=3,
                        progress=False)
    assert _ids(out) == [f"r{i}" for i in range(6)]           # two batches were flushed
    again = FakeReasoner()
    generate_traces(again, _rows(10), out, batch_size=3, progress=False)
    assert len(again.seen) == 4
    assert _ids(out) == [f"r{i}" for i in range(10)]


def test_truncated_last_line_is_cut_and_regenerated_earlier_rows_kept(tmp_path):
    out = tmp_path / "t.jsonl"
    generate_traces(FakeReasoner(), _rows(3), out, progress=False)
    before = out.read_text()
    out.write_text(before + '{"id": "r3", "trace": "<think>Abo')   # killed mid-write
    with pytest.warns(UserWarning, match="last line is truncated"):
        stats = generate_traces(FakeReasoner(), _rows(5), out, progress=False)
    assert stats.repaired_tail and stats.written == 2
    assert out.read_text().startswith(before)
    assert _ids(out) == ["r0", "r1", "r2", "r3", "r4"]


def test_complete_last_line_without_newline_is_kept_not_regenerated(tmp_path):
    out = tmp_path / "t.jsonl"
    generate_traces(FakeReasoner(), _rows(2), out, progress=False)
    out.write_text(out.read_text().rstrip("\n"))
    r = FakeReasoner()
    stats = generate_traces(r, _rows(3), out, progress=False)
    assert not stats.repaired_tail and r.seen[0].startswith("q2")
    assert _ids(out) == ["r0", "r1", "r2"]


def test_malformed_line_inside_the_file_is_an_error_and_nothing_is_dropped(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text('{"id": "r0", "trace": "x"}\n{broken\n{"id": "r1", "trace": "y"}\n')
    before = out.read_text()
    with pytest.raises(DataError, match=r"t\.jsonl line 2: not valid JSON"):
        generate_traces(FakeReasoner(), _rows(3), out, progress=False)
    assert out.read_text() == before


def test_duplicate_ids_are_never_added(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text('{"id": "r0", "trace": "x"}\n{"id": "r0", "trace": "x"}\n')
    rows = _rows(3) + _rows(3)                                 # the dataset repeats ids too
    with pytest.warns(UserWarning, match="2 row.s. record no generation settings"):   # rows of an older file
        stats = generate_traces(FakeReasoner(), rows, out, progress=False)
    assert stats.duplicate_ids_in_file == 1 and stats.total == 3 and stats.written == 2
    assert _ids(out) == ["r0", "r0", "r1", "r2"]               # the old duplicate is left alone


def test_malformed_traces_are_kept_flagged_and_counted(tmp_path):
    out = tmp_path / "t.jsonl"
    r = FakeReasoner(bad_when=lambda q: q in ("q1", "q3"))
    stats = generate_traces(r, _rows(4), out, progress=False)
    assert stats.invalid == 2
    assert [row["valid"] for row in _lines(out)] == [True, False, True, False]
    assert sorted(load_traces(out, valid_only=True)) == ["r0", "r2"]
    again = FakeReasoner()
    generate_traces(again, _rows(4), out, progress=False)
    assert again.calls == 0                                    # flagged rows are not retried


def test_eval_rows_are_accepted_with_a_task_type(tmp_path):
    rows = [EvalRow("e0", TTEInput("q"), [TTEInput("a")], 0)]
    r = FakeReasoner()
    generate_traces(r, rows, tmp_path / "t.jsonl", task_type="qa", progress=False)
    assert r.seen == ["q\n\n" + ECR_PROMPTS["qa"]]


def test_reasoner_returning_too_few_traces_is_an_error(tmp_path):
    class Short:
        def think(self, inputs, **kw):
            return SimpleNamespace(traces=[])
    with pytest.raises(RuntimeError, match="returned 0 traces for a batch of 2"):
        generate_traces(Short(), _rows(2), tmp_path / "t.jsonl", progress=False)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def fake_loader(monkeypatch):
    made = []

    def load(spec):
        made.append(spec)
        return FakeReasoner()
    monkeypatch.setattr(tracegen, "_load_reasoner", load)
    return made


def _train_file(tmp_path, n_missing=0):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    recs = [{"qry": f"q{i}", "qry_image_path": "img.png", "pos_text": "p", "pos_image_path": ""}
            for i in range(5)]
    for i in range(n_missing):
        recs[i]["qry_image_path"] = f"gone{i}.png"
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_traces_main_writes_and_resumes(tmp_path, fake_loader, capsys):
    data, out = _train_file(tmp_path), tmp_path / "out" / "traces.jsonl"
    argv = ["--model", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--no-progress"]
    assert traces_main(argv + ["--limit", "3"]) == 0
    assert fake_loader == ["tiny"] and _ids(out) == ["train:1", "train:2", "train:3"]
    assert traces_main(argv) == 0
    assert _ids(out) == [f"train:{i}" for i in range(1, 6)]
    assert "wrote 2 trace(s); 3 already there" in capsys.readouterr().out


def test_traces_main_missing_image_fails_or_is_skipped_with_skip_bad(tmp_path, fake_loader,
                                                                     capsys):
    data, out = _train_file(tmp_path, n_missing=2), tmp_path / "traces.jsonl"
    argv = ["--model", "tiny", "--data", str(data), "--out", str(out), "--no-progress"]
    assert traces_main(argv) == 2
    assert "gone0.png" in capsys.readouterr().err and not out.exists()
    assert traces_main(argv + ["--skip-bad"]) == 0
    assert "skipped 2 bad row(s)" in capsys.readouterr().err
    assert _ids(out) == ["train:3", "train:4", "train:5"]


def test_traces_main_runs_over_the_digits_train_rows(tmp_path, fake_loader):
    out = tmp_path / "traces.jsonl"
    assert traces_main(["--model", "tiny", "--data", "digits", "--out", str(out), "--limit", "5",
                        "--no-progress"]) == 0
    assert _ids(out) == [f"digits/classify/train/{i}" for i in range(5)]


@pytest.mark.parametrize("content", [
    # the training data itself given as --out, without its final newline (the reported data loss)
    b'{"qry": "q0", "pos_text": "p"}\n{"qry": "q1", "pos_text": "p"}',
    b'{"qry": "q0", "pos_text": "p"}',                      # one line, no newline
    b'{"id": "r1", "trace": "<think>a</think> b"}\n{"qry": "q1"',   # ours, then someone else's
    b"\xff\xfe not text at all",
    b'{"id": "r1", "trace": "x"}\nplain text\n',
])
def test_a_file_that_is_not_this_commands_output_is_refused_untouched(tmp_path, content):
    out = tmp_path / "not_traces.jsonl"
    out.write_bytes(content)
    with pytest.raises(DataError, match=r"not_traces.jsonl.*(left as it is|--out)"):
        generate_traces(FakeReasoner(), _rows(3), out, progress=False)
    assert out.read_bytes() == content


def test_swapped_data_and_out_leaves_the_data_file_whole(tmp_path, fake_loader, capsys):
    data = _train_file(tmp_path)
    data.write_bytes(data.read_bytes().rstrip(b"\n"))   # a JSONL without its final newline
    before = data.read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"qry": "x", "pos_text": "y"}) + "\n")
    code = traces_main(["--model", "tiny", "--data", str(other), "--out", str(data), "--no-progress"])
    assert code == 2 and "not a trace row" in capsys.readouterr().err
    assert data.read_bytes() == before


# ----------------------------------------------------------------------------- trace noise
def _knowledge_rows():
    facts = [("Peru", "Lima", "Spanish"), ("Kenya", "Nairobi", "English"), ("Japan", "Tokyo", "Japanese"),
             ("Brazil", "Brasilia", "Portuguese"), ("Egypt", "Cairo", "Arabic"), ("Chile", "Santiago", "Spanish")]
    rows = []
    for i, (country, capital, lang) in enumerate(facts):
        trace = (f"<think>{capital} is the capital of {country}. The official language of {country} "
                 f"is {lang}.</think> {lang}")
        neg = facts[(i + 1) % len(facts)][2]
        rows.append(TrainRow(f"cl{i}", TTEInput(f"The language of the country whose capital is {capital}?"),
                             TTEInput(lang), TTEInput(neg), task="knowledge/capital_language", trace=trace))
    rows.append(TrainRow("s0", TTEInput("Symbol of carbon?"), TTEInput("C"), TTEInput("N"), task="knowledge/symbol",
                         trace="<think>The chemical symbol of carbon is C.</think> C"))
    rows.append(TrainRow("s1", TTEInput("Symbol of cobalt?"), TTEInput("Co"), TTEInput("Cu"), task="knowledge/symbol",
                         trace="<think>The chemical symbol of cobalt is Co.</think> Co"))
    rows.append(TrainRow("s2", TTEInput("Symbol of iron?"), TTEInput("Fe"), TTEInput("Co"), task="knowledge/symbol",
                         trace="<think>The chemical symbol of iron is Fe.</think> Fe"))
    return rows


def test_swap_answers_changes_a_seeded_fraction_to_another_rows_answer_of_the_same_task():
    rows = _knowledge_rows()
    before = [r.trace for r in rows]
    out = swap_answers(rows, 0.5, seed=3)
    assert [r.trace for r in rows] == before          # the think stage shares the rows: untouched
    changed = [(a, b) for a, b in zip(rows, out) if a.trace != b.trace]
    assert len(changed) == round(0.5 * len(rows))
    by_task = {}
    for r in rows:
        by_task.setdefault(r.task, set()).add(r.trace.split("</think>")[1].strip())
    for old, new in changed:
        wrong = new.trace.split("</think>")[1].strip()
        assert wrong in by_task[old.task]                      # another row's answer, same task
        assert wrong not in (old.pos.text, old.neg.text)       # never the positive or the hard negative
        assert new.pos is old.pos and new.id == old.id         # the positive stays right
        assert check_ecr_shape(new.trace)
        # every standalone mention of the answer changed, nothing else
        assert new.trace == old.trace.replace(f" {old.pos.text}.", f" {wrong}.").replace(
            f"</think> {old.pos.text}", f"</think> {wrong}")
    assert [r.trace for r in swap_answers(rows, 0.5, seed=3)] == [r.trace for r in out]   # seeded
    assert [r.trace for r in swap_answers(rows, 0.5, seed=4)] != [r.trace for r in out]
    assert [r.trace for r in swap_answers(rows, 0.0, seed=3)] == before


def test_swap_answers_replaces_whole_words_only():
    """"C" is carbon's symbol: the C of "The chemical" or "Co" must not change."""
    rows = _knowledge_rows()
    out = swap_answers(rows, 0.99, seed=0)
    carbon = next(r for r in out if r.id == "s0")
    assert carbon.trace.startswith("<think>The chemical symbol of carbon is ")
    assert carbon.trace.split(" is ")[1].split(".")[0] in ("Co", "Fe")


def test_swap_answers_leaves_rows_without_an_ecr_trace_or_another_answer():
    rows = [TrainRow("a", TTEInput("q"), TTEInput("x"), task="t", trace="no tags"),
            TrainRow("b", TTEInput("q"), TTEInput("y"), task="u", trace="<think>so y.</think> y")]
    out = swap_answers(rows, 0.99, seed=0)
    assert [r.trace for r in out] == [r.trace for r in rows]
