import numpy as np
import pytest
from sklearn.datasets import load_digits

from unified_tte.data.digits import (SUBTASKS, WORDS, build_digits, render_digit, teacher_trace,
                                teacher_traces)
from unified_tte.data.traces import check_ecr_shape

LABELS = load_digits().target


@pytest.fixture(scope="module")
def task():
    return build_digits(seed=0)


def _indices(inp):
    return [im.info["digits_index"] for im in inp.images]


def _train_image_indices(rows):
    out = set()
    for r in rows:
        for inp in (r.qry, r.pos, r.neg):
            if inp is not None:
                out.update(_indices(inp))
    return out


def _eval_image_indices(tasks):
    out = set()
    for t in tasks:
        for r in t.rows:
            for inp in [r.query, *r.candidates]:
                out.update(_indices(inp))
    return out


def test_split_covers_every_image_once_and_is_stratified(task):
    train, test = set(task.train_indices), set(task.test_indices)
    assert not train & test and len(train | test) == 1797
    assert len(test) == 540                   # 30% of 1797, rounded up by sklearn
    per_class = np.bincount(LABELS[task.test_indices], minlength=10)
    assert per_class.min() >= 50 and per_class.max() <= 56


def test_no_test_image_appears_in_train_rows(task):
    train_used = _train_image_indices(task.train_rows)
    eval_used = _eval_image_indices(task.eval_tasks)
    assert train_used <= set(task.train_indices)
    assert eval_used <= set(task.test_indices)
    assert not train_used & eval_used
    # Pixels too, not only the bookkeeping: no eval image is byte-equal to a train image
    # unless the raw sklearn digits themselves are equal.
    raw = load_digits().images
    train_bytes = {raw[i].tobytes() for i in train_used}
    assert all(raw[i].tobytes() not in train_bytes for i in eval_used)


def test_same_seed_gives_identical_task_and_other_seed_a_different_split(task):
    again = build_digits(seed=0)
    assert again.train_indices == task.train_indices
    assert [(r.id, r.qry.text, r.pos.text, r.trace, _indices(r.qry), _indices(r.pos))
            for r in again.train_rows] == \
           [(r.id, r.qry.text, r.pos.text, r.trace, _indices(r.qry), _indices(r.pos))
            for r in task.train_rows]
    for a, b in zip(again.eval_tasks, task.eval_tasks):
        assert [(r.id, r.query.text, r.positive, r.meta) for r in a.rows] == \
               [(r.id, r.query.text, r.positive, r.meta) for r in b.rows]
    assert again.eval_tasks[0].rows[0].query.images[0].tobytes() == \
        task.eval_tasks[0].rows[0].query.images[0].tobytes()
    assert build_digits(seed=1, max_train_per_task=1, max_eval_per_task=1).train_indices != \
        task.train_indices


def test_a_subtask_does_not_change_when_others_are_left_out(task):
    alone = build_digits(seed=0, subtasks=["double_last"])
    mine = [r for r in task.train_rows if r.task == "digits/double_last"]
    assert [(r.id, r.meta) for r in alone.train_rows] == [(r.id, r.meta) for r in mine]


def test_sizes_per_subtask(task):
    for sub in SUBTASKS:
        assert sum(r.task == f"digits/{sub}" for r in task.train_rows) == 256
    assert [len(t.rows) for t in task.eval_tasks] == [100] * 5
    full = build_digits(seed=0, max_train_per_task=None, max_eval_per_task=None,
                        subtasks=["classify", "next_number"])
    n_train_1_to_9 = int((LABELS[full.train_indices] >= 1).sum())
    assert sum(r.task == "digits/classify" for r in full.train_rows) == 1257
    assert sum(r.task == "digits/next_number" for r in full.train_rows) == n_train_1_to_9
    assert len(full.eval_tasks[0].rows) == 540


# Each sub-task's rule, stated here rather than read from the builder's `answer` (the meta
# "answer" of a row is the builder's own claim, so holding rows to it alone cannot find a wrong rule).
RULES = {"classify": lambda d: d, "plus_two": lambda d: d + 2, "double_last": lambda d: (2 * d) % 10,
         "next_number": lambda d: d + 1, "same_digit": lambda d: d}


def _value_of(inp):
    """The number a candidate stands for: its number word, or its image's label."""
    if inp.images:
        return int(LABELS[inp.images[0].info["digits_index"]])
    return WORDS.index(inp.text.split()[-1])


def test_every_eval_query_has_ten_candidates_and_the_right_positive(task):
    for t in task.eval_tasks:
        rule = RULES[t.name.split("/")[1]]
        for r in t.rows:
            assert r.meta["answer"] == rule(r.meta["digit"]), (t.name, r.id)
            assert len(r.candidates) >= 10
            values = [_value_of(c) for c in r.candidates]
            assert len(set(values)) == len(values)             # one candidate per answer
            assert values[r.positive] == r.meta["answer"]
            if r.query.images:
                d = int(LABELS[_indices(r.query)[0]])
                assert d == r.meta["digit"]
                assert _indices(r.query)[0] not in [i for c in r.candidates for i in _indices(c)]
    by_name = {t.name: t for t in task.eval_tasks}
    assert {r.meta["digit"] for r in by_name["digits/plus_two"].rows} == set(range(10))  # the rules met every digit
    r = by_name["digits/next_number"].rows[0]
    assert r.query.images == []
    for r in by_name["digits/next_number"].rows:     # the query names the digit before the answer
        named = [w.strip(".") for w in r.query.text.split() if w.strip(".") in WORDS]
        assert named[-1] == WORDS[r.meta["digit"]]
    assert by_name["digits/next_number"].modality_group == "T2I"
    assert [t.needs_reasoning for t in task.eval_tasks] == [False, True, True, True, False]


def test_train_rows_pair_query_with_the_teachers_answer(task):
    for r in task.train_rows:
        assert r.meta["answer"] == RULES[r.task.split("/")[1]](r.meta["digit"]), r.id
        if r.task == "digits/next_number":
            assert _value_of(r.pos) == r.meta["answer"] == r.meta["digit"] + 1
            assert _value_of(r.neg) == r.meta["digit"]        # the hard negative skips the +1
        else:
            assert int(LABELS[_indices(r.qry)[0]]) == r.meta["digit"]
            assert _value_of(r.pos) == r.meta["answer"]
            assert _value_of(r.neg) != r.meta["answer"]
            if r.task == "digits/same_digit":
                assert _indices(r.pos) != _indices(r.qry)
        assert r.trace.endswith(" " + WORDS[r.meta["answer"]])


def test_teacher_traces_are_short_ecr_and_correct():
    assert teacher_trace("plus_two", 3) == \
        "<think>The image shows a 3. Three plus two is five.</think> five"
    assert teacher_trace("double_last", 7) == ("<think>The image shows a 7. Seven doubled is "
                                               "fourteen, whose last digit is four.</think> four")
    assert teacher_trace("next_number", 7) == \
        "<think>The number after seven is eight, so the image should show an 8.</think> eight"
    assert teacher_trace("classify", 0) == "<think>The image shows a 0.</think> zero"
    for sub in SUBTASKS:
        for d in range(9 if sub == "next_number" else 10):
            t = teacher_trace(sub, d)
            assert check_ecr_shape(t), t
            assert len(t.replace("<think>", "").replace("</think>", " ").split()) <= 24, t
    with pytest.raises(ValueError, match="unknown digits sub-task"):
        teacher_trace("minus", 1)


def test_teacher_traces_map_ids_for_the_trace_file(task):
    traces = teacher_traces(task.train_rows)
    assert len(traces) == len(task.train_rows) == 5 * 256
    assert traces["digits/plus_two/train/0"] == task.train_rows[256].trace


def test_render_digit_is_dark_ink_on_white_at_the_requested_size():
    raw = load_digits().images[0]
    img = render_digit(raw, 56)
    assert img.mode == "RGB" and img.size == (56, 56)
    px = np.asarray(img)
    assert px[0, 0].tolist() == [255, 255, 255]            # background pixel (value 0)
    r, c = np.unravel_index(raw.argmax(), raw.shape)        # ink: 255 - value * 255 / 16
    assert px[r * 7 + 3, c * 7 + 3].tolist() == [round(255 - raw[r, c] * 255 / 16)] * 3
    assert render_digit(np.full((8, 8), 16.0)).getpixel((30, 30)) == (0, 0, 0)
    assert render_digit(raw, 28).size == (28, 28)


def test_unknown_subtask_is_rejected():
    with pytest.raises(ValueError, match="unknown digits sub-task"):
        build_digits(subtasks=["classify", "triple"])
