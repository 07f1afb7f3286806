import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unified_tte.data import (DataError, EvalRow, EvalTask, TrainRow, attach_traces,
                              load_eval_task, load_train_rows, load_traces, validate_eval_task)
from unified_tte.model.inputs import TTEInput


def _write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.new("RGB", (8, 8), "white").save(root / name)
    return root


TRAIN = [
    {"qry": "<|image_1|>\nRepresent the given image for classification", "qry_image_path": "a.png",
     "pos_text": "a cat", "pos_image_path": ""},
    {"id": "row-b", "qry": "find a picture of a dog", "qry_image_path": "",
     "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": "sub/c.png",
     "neg_text": "", "neg_image_path": "b.png"},
]


def test_train_rows_map_mmeb_fields_strip_placeholders_and_resolve_images(tmp_path, image_root):
    rows = load_train_rows(_write_jsonl(tmp_path / "cls.jsonl", TRAIN), image_root)
    assert [r.id for r in rows] == ["cls:1", "row-b"]      # file stem + line, else the id field
    a, b = rows
    assert a.qry == TTEInput("Represent the given image for classification",
                             [str(image_root / "a.png")])
    assert a.pos == TTEInput("a cat", []) and a.neg is None and a.task == "cls"
    assert b.qry.images == [] and b.pos.images == [str(image_root / "sub/c.png")]
    assert b.pos.text == "Represent the given image."
    assert b.neg == TTEInput("", [str(image_root / "b.png")])
    assert rows.skipped == []


def _table(records):
    # from_pylist takes its columns from the first record: give every record every key.
    keys = sorted({k for r in records for k in r})
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records])


def test_train_rows_from_parquet_match_jsonl(tmp_path, image_root):
    pq.write_table(_table(TRAIN), tmp_path / "cls.parquet")
    rows = load_train_rows(tmp_path / "cls.parquet", image_root)
    jsonl = load_train_rows(_write_jsonl(tmp_path / "cls.jsonl", TRAIN), image_root)
    # The whole row: a reader that lost a column (e.g. the hard negatives) would keep qry intact.
    assert [(r.qry, r.pos, r.neg, r.task, r.trace) for r in rows] == \
        [(r.qry, r.pos, r.neg, r.task, r.trace) for r in jsonl]
    assert rows[0].id == "cls:0" and rows[1].id == "row-b"   # parquet: 0-based row index


def test_image_root_defaults_to_the_data_files_folder(image_root):
    rows = load_train_rows(_write_jsonl(image_root / "t.jsonl", TRAIN[:1]))
    assert rows[0].qry.images == [str(image_root / "a.png")]


def test_malformed_json_line_error_names_file_and_line(tmp_path, image_root):
    path = _write_jsonl(tmp_path / "bad.jsonl", TRAIN, raw_lines=['{"qry": "x", "pos_text'])
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not valid JSON"):
        load_train_rows(path, image_root)


def test_missing_image_error_names_the_path_and_the_fix(tmp_path, image_root):
    rec = dict(TRAIN[0], qry_image_path="nope/missing.png")
    path = _write_jsonl(tmp_path / "t.jsonl", [TRAIN[1], rec])
    with pytest.raises(DataError) as e:
        load_train_rows(path, image_root)
    msg = str(e.value)
    assert "t.jsonl line 2" in msg and "qry_image_path" in msg
    assert str(image_root / "nope/missing.png") in msg and "--skip-bad" in msg


def test_skip_bad_skips_and_counts_missing_images_and_malformed_lines(tmp_path, image_root):
    rec = dict(TRAIN[0], qry_image_path="missing.png")
    path = _write_jsonl(tmp_path / "t.jsonl", [TRAIN[0], rec, TRAIN[1]], raw_lines=["{oops"])
    rows = load_train_rows(path, image_root, skip_bad=True)
    assert [r.id for r in rows] == ["t:1", "row-b"]
    assert len(rows.skipped) == 2
    assert "missing.png" in rows.skipped[0] and "line 2" in rows.skipped[0]
    assert "line 4" in rows.skipped[1] and "not valid JSON" in rows.skipped[1]


def test_missing_required_field_is_named(tmp_path, image_root):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"qry": "x", "qry_image_path": ""}])
    with pytest.raises(DataError, match="line 1: missing field 'pos_text'"):
        load_train_rows(path, image_root)


def test_unknown_format_and_missing_file_are_data_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_train_rows(tmp_path / "x.csv")
    with pytest.raises(DataError, match="file not found"):
        load_train_rows(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- eval files

EVAL = [
    {"qry_text": "<|image_1|>\nRepresent the given image for classification",
     "qry_img_path": "a.png", "tgt_text": ["cat", "dog", "bird"], "tgt_img_path": ["", "", ""]},
    {"qry_text": "a dog", "qry_img_path": "",
     "tgt_text": ["", ""], "tgt_img_path": ["sub/c.png", "b.png"]},
]


def test_eval_task_first_candidate_is_the_positive(tmp_path, image_root):
    task = load_eval_task(_write_jsonl(tmp_path / "ImageNet-1K.jsonl", EVAL), image_root,
                          group="classification")
    assert task.name == "ImageNet-1K" and task.modality_group == "classification"
    assert task.task_type == "classification"          # MMEB name -> ECR task type
    r0, r1 = task.rows
    assert r0.query.images == [str(image_root / "a.png")]
    assert [c.text for c in r0.candidates] == ["cat", "dog", "bird"] and r0.positive == 0
    assert r1.candidates[1] == TTEInput("", [str(image_root / "b.png")]) and r1.positive == 0


def test_eval_positive_can_be_given_by_index_or_by_content(tmp_path, image_root):
    recs = [dict(EVAL[0], positive=2), dict(EVAL[0], pos_text="dog", pos_img_path="")]
    task = load_eval_task(_write_jsonl(tmp_path / "t.jsonl", recs), image_root)
    assert [r.positive for r in task.rows] == [2, 1]


def test_eval_task_from_parquet_with_list_columns(tmp_path, image_root):
    pq.write_table(_table(EVAL), tmp_path / "t.parquet")
    task = load_eval_task(tmp_path / "t.parquet", image_root)
    assert [len(r.candidates) for r in task.rows] == [3, 2]


def test_empty_candidate_list_error_names_task_and_row(tmp_path, image_root):
    recs = [EVAL[0], dict(EVAL[0], id="q7", tgt_text=[], tgt_img_path=[])]
    with pytest.raises(DataError, match=r"line 2: task 'mytask' row 'q7': empty candidate list"):
        load_eval_task(_write_jsonl(tmp_path / "t.jsonl", recs), image_root, name="mytask")


def test_positive_missing_from_candidates_error_names_task_and_row(tmp_path, image_root):
    by_content = dict(EVAL[0], pos_text="zebra")
    with pytest.raises(DataError, match=r"task 't' row 't:1': the positive .*'zebra'.* not among"):
        load_eval_task(_write_jsonl(tmp_path / "t.jsonl", [by_content]), image_root)
    by_index = dict(EVAL[0], positive=3)
    with pytest.raises(DataError, match=r"task 't' row 't:1': the positive \(index 3\)"):
        load_eval_task(_write_jsonl(tmp_path / "t.jsonl", [by_index]), image_root)


def test_candidate_lists_of_unequal_length_are_an_error(tmp_path, image_root):
    rec = dict(EVAL[0], tgt_img_path=["", ""])
    with pytest.raises(DataError, match="'tgt_text' has 3 entries but 'tgt_img_path' has 2"):
        load_eval_task(_write_jsonl(tmp_path / "t.jsonl", [rec]), image_root)


def test_validate_eval_task_checks_tasks_built_in_code():
    q = TTEInput("q")
    validate_eval_task(EvalTask("ok", "T2T", [EvalRow("r0", q, [q, q], 1)]))
    with pytest.raises(DataError, match="task 'bad' row 'r1': the positive"):
        validate_eval_task(EvalTask("bad", "T2T", [EvalRow("r0", q, [q], 0),
                                                   EvalRow("r1", q, [q], 1)]))
    with pytest.raises(DataError, match="task 'bad' row 'r0': empty candidate list"):
        validate_eval_task(EvalTask("bad", "T2T", [EvalRow("r0", q, [], 0)]))


# ----------------------------------------------------------------------------- traces

def test_load_traces_refuses_a_repeated_id_and_can_drop_invalid(tmp_path):
    rows = [{"id": "a", "trace": "<think>x</think> one", "valid": True},
            {"id": "b", "trace": "rambling", "valid": False}]
    path = _write_jsonl(tmp_path / "tr.jsonl", rows)
    assert load_traces(path) == {"a": "<think>x</think> one", "b": "rambling"}
    assert load_traces(path, valid_only=True) == {"a": "<think>x</think> one"}
    twice = _write_jsonl(tmp_path / "twice.jsonl", rows + [{"id": "a", "trace": "<think>y</think> two"}])
    with pytest.raises(DataError, match=r"twice\.jsonl line 3: id 'a' is given twice \(first at .*twice\.jsonl line 1\)"):
        load_traces(twice)   # which of the two would train is unknown


def test_load_traces_malformed_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "tr.jsonl", [{"id": "a", "trace": "t"}], raw_lines=['{"id": "b"'])
    with pytest.raises(DataError, match=r"tr\.jsonl line 2: not valid JSON"):
        load_traces(path)
    path = _write_jsonl(tmp_path / "tr2.jsonl", [{"id": "a"}])
    with pytest.raises(DataError, match=r"tr2\.jsonl line 1: a trace row needs 'id' and 'trace'"):
        load_traces(path)


def test_attach_traces_by_id_with_a_policy_for_missing_ones():
    rows = [TrainRow(f"r{i}", TTEInput("q"), TTEInput("p")) for i in range(3)]
    traces = {"r0": "<think>a</think> b", "r2": "<think>c</think> d"}
    with pytest.raises(DataError, match=r"1 of 3 rows have no trace \(first: \['r1'\]\)"):
        attach_traces(rows, traces)
    kept = attach_traces(rows, traces, missing="drop")
    assert [r.id for r in kept] == ["r0", "r2"] and kept[1].trace == "<think>c</think> d"
    assert len(attach_traces(rows, traces, missing="keep")) == 3
