import json

import pytest
import yaml
from PIL import Image

from unified_tte.data import DataError, builtin_registry, load_registry, resolve_tasks
from unified_tte.data.digits import SUBTASKS


@pytest.fixture
def user_registry(tmp_path):
    """A registry YAML with two local tasks, paths relative to the YAML's folder."""
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "img" / "q.png")
    rows = [{"qry_text": "q", "qry_img_path": "q.png", "tgt_text": ["a", "b"],
             "tgt_img_path": ["", ""]}] * 3
    (tmp_path / "data" / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "data" / "ret.jsonl").write_text(json.dumps(
        {"qry_text": "x", "qry_img_path": "", "tgt_text": ["y", "z"], "tgt_img_path": ["", ""]}))
    reg = {"MyCls": {"path": "data/cls.jsonl", "image_root": "data/img", "group": "classification",
                     "needs_reasoning": True},
           "MyRet": {"path": "data/ret.jsonl", "group": "T2T"}}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(reg))
    return path


def test_user_registry_resolves_relative_paths_and_fields(user_registry):
    specs = load_registry(user_registry)
    assert specs["MyCls"].path == user_registry.parent / "data/cls.jsonl"
    assert specs["MyCls"].image_root == user_registry.parent / "data/img"
    assert specs["MyRet"].image_root is None and specs["MyRet"].group == "T2T"
    tasks = resolve_tasks(str(user_registry))
    assert [t.name for t in tasks] == ["MyCls", "MyRet"]
    assert tasks[0].modality_group == "classification" and tasks[0].needs_reasoning
    assert len(tasks[0].rows) == 3


def test_names_from_a_user_registry_mix_with_builtins_and_cap_rows(user_registry):
    tasks = resolve_tasks("MyCls, digits/plus_two", registry=user_registry, max_rows=2)
    assert [t.name for t in tasks] == ["MyCls", "digits/plus_two"]
    assert [len(t.rows) for t in tasks] == [2, 2]


def test_unknown_task_names_the_known_ones():
    with pytest.raises(DataError, match=r"unknown task 'nope'.*'digits'"):
        resolve_tasks("nope")
    with pytest.raises(DataError, match="unknown sub-task 'digits/nope'"):
        resolve_tasks("digits/nope")


def test_registry_entry_without_path_is_an_error(tmp_path):
    (tmp_path / "r.yaml").write_text("T: {group: I2T}\n")
    with pytest.raises(DataError, match=r"r\.yaml task 'T': missing field 'path'"):
        load_registry(tmp_path / "r.yaml")
    (tmp_path / "r2.yaml").write_text("T: {path: x.jsonl, grup: I2T}\n")
    with pytest.raises(DataError, match=r"unknown field\(s\) \['grup'\]"):
        load_registry(tmp_path / "r2.yaml")


def test_registry_pointing_at_a_missing_file_fails_when_resolved(tmp_path):
    (tmp_path / "r.yaml").write_text("T: {path: missing.jsonl}\n")
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        resolve_tasks(str(tmp_path / "r.yaml"))


def test_builtin_digits_registry_resolves_to_every_subtask():
    assert builtin_registry()["digits"].builtin == "digits"
    tasks = resolve_tasks("digits", max_rows=5)
    assert [t.name for t in tasks] == [f"digits/{s}" for s in SUBTASKS]
    assert {t.modality_group for t in tasks} == {"I2T", "T2I", "I2I"}
    assert all(len(t.rows) == 5 for t in tasks)


def test_builtin_overrides_reach_the_digits_builder():
    (task,) = resolve_tasks(["digits/classify"], max_rows=1, image_size=28)
    assert task.rows[0].query.images[0].size == (28, 28)


def test_a_task_named_twice_is_an_error():
    with pytest.raises(DataError, match="named more than once"):
        resolve_tasks("digits,digits/classify", max_rows=1)
