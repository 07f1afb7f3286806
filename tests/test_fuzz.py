"""A table of bad inputs against every `tte` command and the public API. For each row: exit code 2
(or the documented exception type), the error is the last stderr line with the command's prefix
and names the file, row, field or argument, no traceback, and no input file changed (sha256 of
everything under inputs/ before and after). Rows that need a model use the tiny built-ins."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from unified_tte.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY_CPU = REPO / "recipes" / "tiny_cpu.yaml"


# ----------------------------------------------------------------------------- helpers

def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def train_rows(n=4, **override):
    rows = [{"qry": f"query {i}", "pos_text": f"positive {i}", "neg_text": f"negative {i}"} for i in range(n)]
    rows[1].update(override)
    return rows


def recipe(inputs: Path, **fields) -> Path:
    """A runnable tiny recipe in inputs/, with its run_dir in out/."""
    raw = {"run_dir": str(inputs.parent / "out" / "run"), "backbone": "tiny",
           "deepspeed": str(REPO / "recipes/deepspeed/zero0.json"), "stages": ["embed"],
           "data": {"train": "digits", "digits": {"max_train_per_task": 4}},
           "embed": {"steps": 1, "batch_size": 4, "gradcache_chunk": None},
           "progress_bar": False, "wandb": {"mode": "disabled"}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    import yaml
    return write(inputs / "recipe.yaml", yaml.safe_dump(raw))


def png(path: Path, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 80, 120)).save(path)
    return path


def run_dir(inputs: Path) -> Path:
    """A training run folder as `tte train` leaves it (adapters, config), built without training."""
    from unified_tte import UnifiedTTE
    from unified_tte.model import adapters
    from unified_tte.model.zoo import tiny_qwen2vl

    tte = UnifiedTTE(tiny_qwen2vl())
    run = inputs / "run"
    for name in tte.embed_adapters:
        adapters.save_adapter(tte.peft_model, name, run / name)
    write(run / "tte_config.json", json.dumps({**tte.config.to_dict(), "backbone": "tiny"}))
    return run


def checkpoint(inputs: Path) -> Path:
    from unified_tte import UnifiedTTE
    from unified_tte.export import export_model
    from unified_tte.model.zoo import tiny_qwen2vl

    return export_model(UnifiedTTE(tiny_qwen2vl()), inputs / "ckpt", backbone_spec="tiny")


# ----------------------------------------------------------------------------- the table
# name: (setup(inputs) -> argv, words the error line must contain)

def _symlink_loop(inputs):
    (inputs / "loop.yaml").symlink_to(inputs / "loop.yaml")
    return ["train", str(inputs / "loop.yaml")], ["loop.yaml"]


def _resume_other_backbone(inputs):
    r = recipe(inputs, stop_after=1, checkpoint_every=1, embed={"steps": 2})
    assert main(["train", str(r)]) == 0
    return ["train", str(r), "backbone=tiny-llama", "--resume"], ["backbone", "tiny-llama"]


def _tampered_checkpoint(inputs):
    ck = checkpoint(inputs)
    cfg = ck / "embed" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 16', '"r": 16 '))
    return ["eval", str(ck), "--tasks", "digits"], ["adapter_config.json"]


def _pickle_in_checkpoint(inputs):
    ck = checkpoint(inputs)
    write(ck / "embed" / "extra.bin", b"\x80\x04pickled")
    return ["eval", str(ck), "--tasks", "digits"], ["extra.bin", "pickle"]


def _export_into_user_folder(inputs):
    run = run_dir(inputs)
    write(inputs / "mine" / "notes.txt", "keep me")
    return ["export", str(run), "--out", str(inputs / "mine")], ["mine", "--overwrite"]


CASES = {
    # tte train: recipes
    "train: recipe missing": (lambda i: (["train", str(i / "nope.yaml")], ["nope.yaml", "not found"])),
    "train: recipe is a folder": (lambda i: (["train", str(write(i / "d" / "x", "") and i / "d")], ["d"])),
    "train: recipe empty": (lambda i: (["train", str(write(i / "empty.yaml", ""))], ["empty.yaml", "empty"])),
    "train: recipe not UTF-8": (lambda i: (["train", str(write(i / "bin.yaml", b"\xff\xfe\x00garbage"))],
                                           ["bin.yaml"])),
    "train: recipe not a mapping": (lambda i: (["train", str(write(i / "list.yaml", "- a\n- b\n"))],
                                               ["list.yaml", "mapping"])),
    "train: unknown key": (lambda i: (["train", str(recipe(i, learning_rate=1))], ["learning_rate"])),
    "train: NaN learning rate": (lambda i: (["train", str(recipe(i)), "embed.lr=.nan"], ["embed.lr", "finite"])),
    "train: negative weight decay": (lambda i: (["train", str(recipe(i, embed={"weight_decay": -1}))],
                                                ["embed.weight_decay"])),
    "train: override without =": (lambda i: (["train", str(recipe(i)), "embed.lr"], ["embed.lr", "key=value"])),
    "train: deepspeed JSON owns lr": (lambda i: (["train", str(recipe(i, deepspeed=str(write(
        i / "ds.json", json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})))))],
        ["ds.json", "optimizer.params.lr"])),
    "train: deepspeed JSON broken": (lambda i: (["train", str(recipe(i, deepspeed=str(write(i / "ds.json", "{"))))],
                                                ["ds.json", "not valid JSON"])),
    "train: data file missing": (lambda i: (["train", str(recipe(i, data={"train": [str(i / "gone.jsonl")]}))],
                                            ["gone.jsonl"])),
    "train: data file empty": (lambda i: (["train", str(recipe(i, data={"train": [str(write(i / "zero.jsonl", ""))]}))],
                                          ["no rows"])),
    "train: qry is a number": (lambda i: (["train", str(recipe(i, data={"train": [str(jsonl(
        i / "rows.jsonl", train_rows(qry=12345)))]}))], ["rows.jsonl line 2", "'qry'"])),
    "train: qry is a mapping": (lambda i: (["train", str(recipe(i, data={"train": [str(jsonl(
        i / "rows.jsonl", train_rows(qry={"x": 1})))]}))], ["rows.jsonl line 2", "'qry'"])),
    "train: pos_text is a list": (lambda i: (["train", str(recipe(i, data={"train": [str(jsonl(
        i / "rows.jsonl", train_rows(pos_text=[1, 2])))]}))], ["line 2", "'pos_text'"])),
    "train: line not JSON": (lambda i: (["train", str(recipe(i, data={"train": [str(write(
        i / "rows.jsonl", '{"qry": "a", "pos_text": "b"}\n{"qry": \n'))]}))], ["rows.jsonl line 2", "JSON"])),
    "train: corrupt parquet": (lambda i: (["train", str(recipe(i, data={"train": [str(write(
        i / "rows.parquet", b"PAR1 this is not parquet"))]}))], ["rows.parquet"])),
    "train: image missing": (lambda i: (["train", str(recipe(i, data={"train": [str(jsonl(
        i / "rows.jsonl", train_rows(qry_image_path="missing.png")))]}))], ["line 2", "qry_image_path", "missing.png"])),
    "train: zero-byte image": (lambda i: (["train", str(recipe(i, data={"train": [str(jsonl(
        i / "rows.jsonl", train_rows(qry_image_path=str(write(i / "empty.png", b"")))))]}))], ["line 2", "empty.png"])),
    "train: 0x0 image": (lambda i: (["train", str(recipe(i, data={"train": [str(jsonl(
        i / "rows.jsonl", train_rows(qry_image_path=str(write(i / "zero.gif", b"GIF89a\x00\x00\x00\x00\x80\x00\x00")))))]}))],
        ["line 2", "zero.gif"])),
    "train: batch larger than the data": (lambda i: (["train", str(recipe(i, embed={"batch_size": 4096}))],
                                                     ["batch_size"])),
    "train: symlink loop": _symlink_loop,
    "train: resume with another backbone": _resume_other_backbone,
    # tte traces
    "traces: data and out swapped": (lambda i: (["traces", "--model", "tiny", "--data", str(jsonl(
        i / "other.jsonl", train_rows())), "--out", str(write(i / "train.jsonl", '{"qry": "a", "pos_text": "b"}'))],
        ["train.jsonl", "not a trace row"])),
    "traces: out is a folder": (lambda i: (["traces", "--model", "tiny", "--data", str(jsonl(
        i / "rows.jsonl", train_rows())), "--out", str(write(i / "outdir" / "keep", "") and i / "outdir")], ["outdir"])),
    "traces: batch size 0": (lambda i: (["traces", "--model", "tiny", "--data", "digits", "--out",
                                         str(i.parent / "out" / "t.jsonl"), "--batch-size", "0"], ["--batch-size"])),
    "traces: max-new-tokens 0": (lambda i: (["traces", "--model", "tiny", "--data", "digits", "--out",
                                             str(i.parent / "out" / "t.jsonl"), "--max-new-tokens", "0"],
                                            ["--max-new-tokens"])),
    "traces: data missing": (lambda i: (["traces", "--model", "tiny", "--data", str(i / "gone.jsonl"), "--out",
                                         str(i.parent / "out" / "t.jsonl")], ["gone.jsonl"])),
    "traces: data not UTF-8": (lambda i: (["traces", "--model", "tiny", "--data", str(write(
        i / "latin.jsonl", b'{"qry": "caf\xe9", "pos_text": "x"}\n')), "--out", str(i.parent / "out" / "t.jsonl")],
        ["latin.jsonl"])),
    "traces: data is a folder of nothing": (lambda i: (["traces", "--model", "tiny", "--data", str(
        write(i / "empty" / "README", "") and i / "empty"), "--out", str(i.parent / "out" / "t.jsonl")], ["empty"])),
    "traces: model folder without config": (lambda i: (["traces", "--model", str(write(i / "model" / "x", "") and
        i / "model"), "--data", "digits", "--out", str(i.parent / "out" / "t.jsonl")], ["model", "config.json"])),
    # tte eval
    "eval: checkpoint missing": (lambda i: (["eval", str(i / "nowhere")], ["nowhere"])),
    "eval: checkpoint is a file": (lambda i: (["eval", str(write(i / "ckpt.txt", "x"))], ["ckpt.txt"])),
    "eval: tampered checkpoint": _tampered_checkpoint,
    "eval: pickle in checkpoint": _pickle_in_checkpoint,
    "eval: unknown task": (lambda i: (["eval", str(i / "nowhere"), "--tasks", "no_such_task"], ["no_such_task"])),
    "eval: batch size 0": (lambda i: (["eval", str(i / "nowhere"), "--batch-size", "0"], ["--batch-size"])),
    "eval: registry not YAML": (lambda i: (["eval", str(i / "nowhere"), "--tasks", str(write(
        i / "reg.yaml", "a: [unclosed\n"))], ["reg.yaml"])),
    "eval: task with empty candidates": (lambda i: (["eval", str(i / "nowhere"), "--tasks", str(write(
        i / "reg.yaml", f"t: {{path: {jsonl(i / 'task.jsonl', [{'qry_text': 'q', 'tgt_text': []}])}}}\n"))],
        ["task.jsonl", "candidate"])),
    # tte export
    "export: run missing": (lambda i: (["export", str(i / "norun"), "--out", str(i.parent / "out" / "ck")], ["norun"])),
    "export: run without its embed adapter": (lambda i: (["export", str(
        shutil.rmtree(run_dir(i) / "embed") or i / "run"), "--out", str(i.parent / "out" / "ck")], ["embed"])),
    "export: out is a file": (lambda i: (["export", str(run_dir(i)), "--out", str(write(i / "file.txt", "x"))],
                                         ["file.txt"])),
    "export: out holds the user's files": _export_into_user_folder,
    # tte bench
    "bench: query length 0": (lambda i: (["bench", "--query-lens", "0", "--out", str(i.parent / "out" / "b")],
                                         ["--query-lens"])),
    "bench: repeats 0": (lambda i: (["bench", "--repeats", "0", "--out", str(i.parent / "out" / "b")], ["--repeats"])),
    "bench: backbone folder missing": (lambda i: (["bench", "--quick", "--backbone", str(i / "nomodel"), "--out",
                                                   str(i.parent / "out" / "b")], ["nomodel"])),
    # tte demo
    "demo: out is a file": (lambda i: (["demo", "--quick", "--no-bench", "--out", str(write(i / "demo.txt", "x"))],
                                       ["demo.txt"])),
}


def snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_named_line_exit_2_and_touches_no_input(name, tmp_path, capsys, monkeypatch):
    inputs = fresh_inputs(tmp_path, monkeypatch)
    argv, words = CASES[name](inputs)
    assert_one_error_line(name, argv, words, 2, inputs, capsys)


def fresh_inputs(tmp_path, monkeypatch) -> Path:
    """An empty inputs/ folder for a row; commands run from the repository root, without --debug."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TTE_DEBUG", "0")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return inputs


def assert_one_error_line(name, argv, words, expected_code, inputs, capsys) -> str:
    """Run `tte argv`: exit `expected_code`, no traceback, the last stderr line is the command's
    error naming `words`, and nothing under `inputs` changed. Returns that line."""
    capsys.readouterr()
    before = snapshot(inputs)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == expected_code, f"{name}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tte {argv[0]}: error: "), last
    assert all(w in last for w in words), f"{name}: {last!r} should name {words}"
    assert snapshot(inputs) == before, f"{name}: an input file changed"
    return last


def test_the_table_is_large_and_covers_every_command():
    from unified_tte.cli import SUBCOMMANDS

    assert len(CASES) >= 40
    assert {name.split(":")[0] for name in CASES} >= set(SUBCOMMANDS) - {"doctor", "plan"}


# ----------------------------------------------------------------------------- the API

@pytest.mark.parametrize("build, error, words", [
    (lambda: __import__("unified_tte").TTEInput(123), "InputError", ["text must be a string"]),
    (lambda: __import__("unified_tte").TTEInput("x", images=5), "InputError", ["images must be a list"]),
    (lambda: __import__("unified_tte").TTEInput("x", max_pixels=10), "InputError", ["max_pixels"]),
])
def test_api_bad_inputs_raise_the_documented_type(build, error, words):
    with pytest.raises(Exception) as info:
        build()
    assert type(info.value).__name__ == error and all(w in str(info.value) for w in words)


# ----------------------------------------------------------------------------- a kill mid-export

@pytest.mark.slow
def test_sigkill_during_export_leaves_the_old_checkpoint_or_a_refused_one(tmp_path):
    """Kill `tte export` at random points: afterwards the folder either loads (the old or the new
    checkpoint, whole) or is refused by name; a user's file in it is never lost."""
    inputs = tmp_path / "inputs"
    run = run_dir(inputs)
    out = tmp_path / "ck"
    assert main(["export", str(run), "--out", str(out)]) == 0
    (out / "NOTES.md").write_text("mine")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path)}
    for delay in (0.5, 2.0, 3.5):
        proc = subprocess.Popen([sys.executable, "-m", "unified_tte.cli", "export", str(run), "--out", str(out),
                                 "--merge-think", "--overwrite"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert (out / "NOTES.md").read_text() == "mine"
        code = subprocess.run([sys.executable, "-c", f"from unified_tte import UnifiedTTE; UnifiedTTE.from_checkpoint({str(out)!r})"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        assert code.returncode == 0 or "CheckpointError" in code.stderr, code.stderr[-1500:]
