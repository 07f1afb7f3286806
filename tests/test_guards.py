"""Nothing the user wrote is changed or mixed (issue 23): the run-folder lock, export's guards
against run folders and symlinks, the resume guards on steps and ZeRO stage, one log per run,
trace files that record and check their generation settings, and the retests' bad inputs, each
one error line with its exit code, no traceback, no input file changed.

    python -m pytest -q -p no:cacheprovider tests/test_guards.py -m "not slow"   # ~2 min on 2 cores
    python -m pytest -q -p no:cacheprovider tests/test_guards.py -m slow         # two real `tte train`s, kill -9

The slow tests start real `tte train` processes: two into one run_dir at once, and one killed
with SIGKILL at random moments and resumed; both must end with the log and adapters of a solo run.
"""
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from PIL import Image

from test_fuzz import (REPO, assert_one_error_line, checkpoint, fresh_inputs, jsonl, recipe, run_dir, snapshot, train_rows,
                       write)
from unified_tte.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ZERO2 = str(REPO / "recipes" / "deepspeed" / "zero2.json")


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail (EFBIG) as they do on a full disk: torch, safetensors and Python's
    own writes raise their real errors. SIGXFSZ is ignored so the write returns the error."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def no_call(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran before the bad input was refused")
    return refuse


def edit_checkpoint(ck: Path, change: Callable[[dict], None], rel: str = "tte_config.json") -> Path:
    """Change a JSON file of an exported checkpoint and re-hash the manifest, as someone who can
    rewrite the folder would (the manifest then no longer catches it; the field checks must)."""
    from unified_tte.model.checkpoint import write_manifest

    path = ck / rel
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    if rel != "manifest.json":
        write_manifest(ck)
    return ck


def immutable(folder: Path) -> Path:
    """A folder nobody may create files in, root included (chattr +i); skips where unsupported."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    return folder


@dataclass
class Case:
    argv: list
    words: list
    code: int = 2
    during: Callable = contextlib.nullcontext    # a context the command runs in
    after: Callable | None = None                # a check once it has returned
    env: dict = field(default_factory=dict)


def _zero_optimization_list(i, mp):
    ds = write(i / "ds.json", json.dumps({"zero_optimization": []}))
    return Case(["train", str(recipe(i, deepspeed=str(ds)))], ["ds.json", "zero_optimization", "JSON object"])


def _checkpoint_without(key):
    def setup(i, mp):
        ck = edit_checkpoint(checkpoint(i), lambda d: d.pop(key))
        return Case(["eval", str(ck), "--tasks", "digits"], ["tte_config.json", key])
    return setup


def _checkpoint_field(key, value):
    def setup(i, mp):
        ck = edit_checkpoint(checkpoint(i), lambda d: d.update({key: value}))
        return Case(["eval", str(ck), "--tasks", "digits"], ["tte_config.json", key])
    return setup


def _run_with_a_bad_lora_r(i, mp):
    run = run_dir(i)
    cfg = json.loads((run / "tte_config.json").read_text())
    (run / "tte_config.json").write_text(json.dumps({**cfg, "lora_r": "sixteen"}))
    return Case(["export", str(run), "--out", str(i.parent / "out" / "ck")], ["tte_config.json", "lora_r", "sixteen"])


def _manifest_entry(key, value):
    def setup(i, mp):
        ck = checkpoint(i)
        edit_checkpoint(ck, lambda d: d["files"]["embed/adapter_model.safetensors"].update({key: value}),
                        rel="manifest.json")
        return Case(["eval", str(ck), "--tasks", "digits"], ["manifest.json", "malformed", repr(value)])
    return setup


def _image_root_in_a_loop(i, mp):
    (i / "loop").symlink_to(i / "loop")
    return Case(["train", str(recipe(i, data={"image_root": str(i / "loop" / "images")}))],
                ["data.image_root", "loop"])


def _resume_on_another_zero_stage(i, mp):
    r = recipe(i, deepspeed=ZERO2, stop_after=1, checkpoint_every=1, embed={"steps": 2})
    assert main(["train", str(r)]) == 0
    return Case(["train", str(r), "deepspeed=" + str(REPO / "recipes/deepspeed/zero3.json"), "--resume"],
                ["ZeRO stage 2", "zero3.json", "stage 3"])


def _train_onto_a_full_disk(i, mp):
    return Case(["train", str(recipe(i, checkpoint_every=1))], ["writing", "checkpoints/step_1", "--resume"],
                code=1, during=lambda: file_size_limit(64 * 1024))


def _re_export_onto_a_full_disk(i, mp):
    run = run_dir(i)
    assert main(["export", str(run), "--out", str(i / "ck")]) == 0   # the old export, an input
    return Case(["export", str(run), "--out", str(i / "ck")], ["writing", "was not touched"],
                code=1, during=lambda: file_size_limit(64 * 1024))


def _kernel_backend(value, command):
    def setup(i, mp):
        mp.setattr("unified_tte.train.loop.load_rows", no_call("loading the data"))
        mp.setattr("unified_tte.eval.evaluate._load_model", no_call("loading the model"))
        argv = ["train", str(recipe(i))] if command == "train" else ["eval", str(i / "nowhere"), "--tasks", "digits"]
        return Case(argv, ["TTE_KERNEL_BACKEND", value], env={"TTE_KERNEL_BACKEND": value})
    return setup


def _run_dir_is_a_file(i, mp):
    mp.setattr("unified_tte.train.loop.load_rows", no_call("loading the data"))
    return Case(["train", str(recipe(i, run_dir=str(write(i / "runfile", "mine"))))], ["run_dir", "runfile", "is a file"])


def _eval_out_read_only(i, mp):
    folder = immutable(i.parent / "out" / "ro")
    return Case(["eval", str(i / "nowhere"), "--out", str(folder / "results.json")], ["--out", "ro", "cannot create"],
                after=lambda: subprocess.run(["chattr", "-i", str(folder)]))


def _eval_out_is_a_folder(i, mp):
    mp.setattr("unified_tte.eval.evaluate._load_model", no_call("loading the model"))
    write(i / "results" / "keep.txt", "mine")
    return Case(["eval", str(i / "nowhere"), "--out", str(i / "results")], ["--out", "results", "is a folder"])


def _eval_cache_dir_is_a_file(i, mp):
    return Case(["eval", str(i / "nowhere"), "--cache-dir", str(write(i / "cache", "x"))], ["--cache-dir", "is a file"])


def _large_non_pickle_bin(i, mp):
    ck = checkpoint(i)
    write(ck / "embed" / "extra.bin", os.urandom(1 << 20))
    return Case(["eval", str(ck), "--tasks", "digits"], ["extra.bin", "refused by its name", "does not begin like a pickle"])


def _task_option_typo(i, mp):
    return Case(["traces", "--model", "tiny", "--data", "digits", "--task-option", "sed=1", "--out",
                 str(i.parent / "out" / "t.jsonl")], ["digits", "'sed'", "known", "seed"])


def _registry_option_typo(i, mp):
    reg = write(i / "reg.yaml", "mine: {builtin: digits, sed: 1}\n")
    return Case(["eval", str(i / "nowhere"), "--tasks", str(reg)], ["reg.yaml", "'sed'", "known", "seed"])


def _empty_data_with_traces(i, mp):
    traces = jsonl(i / "traces.jsonl", [{"id": f"train:{n}", "trace": "<think>a</think> b"} for n in range(16)])
    return Case(["train", str(recipe(i, data={"train": [str(write(i / "zero.jsonl", ""))], "traces": [str(traces)]}))],
                ["no rows"])


def _traces_onto_a_full_disk(i, mp):
    out = i.parent / "out" / "t.jsonl"
    return Case(["traces", "--model", "tiny", "--data", str(jsonl(i / "rows.jsonl", train_rows())), "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "64", "--no-progress"], ["t.jsonl", "writing", "whole rows"],
                code=1, during=lambda: file_size_limit(200),   # more than the lock's record, less than a batch
                after=lambda: not out.exists() or pytest.fail(f"{out} was left behind ({out.stat().st_size} bytes)"))


def _duplicate_trace_ids(i, mp):
    rows = jsonl(i / "rows.jsonl", train_rows())
    traces = jsonl(i / "traces.jsonl", [{"id": f"rows:{n}", "trace": "<think>a</think> b"} for n in range(1, 5)]
                   + [{"id": "rows:1", "trace": "<think>c</think> d"}])   # which of rows:1's two would train?
    return Case(["train", str(recipe(i, data={"train": [str(rows)], "traces": [str(traces)]}))],
                ["traces.jsonl line 5", "'rows:1'", "twice", "line 1"])


@contextlib.contextmanager
def held_elsewhere(lock_path: Path):
    """A lock file as another live process holds it: its record written and an flock taken on
    a separate open file description (which conflicts with this process's own, as with a peer's)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": 4242, "command": "tte test", "since": time.time()}))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    lock_path.unlink()


def _train_into_a_run_in_use(i, mp):
    mp.setattr("unified_tte.train.loop.load_rows", no_call("loading the data"))
    out = i.parent / "out" / "run"
    return Case(["train", str(recipe(i))], ["out/run is in use by pid 4242", socket.gethostname(), "tte test",
                                            ".tte.lock"], during=lambda: held_elsewhere(out / ".tte.lock"))


def _traces_onto_a_file_in_use(i, mp):
    mp.setattr("unified_tte.tracegen._load_rows", no_call("loading the data"))
    out = i.parent / "out" / "t.jsonl"
    return Case(["traces", "--model", "tiny", "--data", "digits", "--out", str(out)], ["t.jsonl is in use by pid 4242",
                "t.jsonl.lock"], during=lambda: held_elsewhere(out.with_name("t.jsonl.lock")))


def _eval_into_a_cache_in_use(i, mp):
    mp.setattr("unified_tte.eval.evaluate._load_model", no_call("loading the model"))
    cache = i.parent / "out" / "cache"
    return Case(["eval", str(i / "nowhere"), "--cache-dir", str(cache)], ["cache is in use by pid 4242"],
                during=lambda: held_elsewhere(cache / ".tte.lock"))


def _export_of_a_run_in_training(i, mp):
    mp.setattr("unified_tte.export.export_model", no_call("writing the export"))
    run = run_dir(i)
    return Case(["export", str(run), "--out", str(i.parent / "out" / "ck")], ["run is in use by pid 4242"],
                during=lambda: held_elsewhere(run / ".tte.lock"))


GUARD_CASES = {
    "train: DeepSpeed zero_optimization is a list": _zero_optimization_list,
    "eval: tte_config.json without invocation_ids": _checkpoint_without("invocation_ids"),
    "eval: tte_config.json without the base weight hash": _checkpoint_without("base_weight_hash"),
    "eval: tte_config.json with lora_r 'sixteen'": _checkpoint_field("lora_r", "sixteen"),
    "eval: tte_config.json with max_length -4": _checkpoint_field("max_length", -4),
    "export: a run's tte_config.json with lora_r 'sixteen'": _run_with_a_bad_lora_r,
    "eval: manifest sha256 is a number": _manifest_entry("sha256", 5),
    "eval: manifest bytes is a string": _manifest_entry("bytes", "1145"),
    "train: data.image_root in a symlink loop": _image_root_in_a_loop,
    "train: resume on another ZeRO stage": _resume_on_another_zero_stage,
    "train: a full disk under run_dir": _train_onto_a_full_disk,
    "export: a full disk under a re-export": _re_export_onto_a_full_disk,
    "train: TTE_KERNEL_BACKEND=bogus": _kernel_backend("bogus", "train"),
    "eval: TTE_KERNEL_BACKEND=triton on a CPU": _kernel_backend("triton", "eval"),
    "train: run_dir is a file": _run_dir_is_a_file,
    "eval: --out in a read-only folder": _eval_out_read_only,
    "eval: --out is a folder": _eval_out_is_a_folder,
    "eval: --cache-dir is a file": _eval_cache_dir_is_a_file,
    "eval: a large .bin that is no pickle": _large_non_pickle_bin,
    "traces: --task-option sed=1": _task_option_typo,
    "eval: a registry builtin entry with sed": _registry_option_typo,
    "train: an empty data file with traces": _empty_data_with_traces,
    "traces: a full disk under --out": _traces_onto_a_full_disk,
    "train: a trace id given twice": _duplicate_trace_ids,
    "train: run_dir in use": _train_into_a_run_in_use,
    "traces: --out in use": _traces_onto_a_file_in_use,
    "eval: --cache-dir in use": _eval_into_a_cache_in_use,
    "export: a run in training": _export_of_a_run_in_training,
}


@pytest.mark.parametrize("name", sorted(GUARD_CASES))
def test_guarded_input_is_one_named_line_with_its_exit_code(name, tmp_path, capsys, monkeypatch):
    inputs = fresh_inputs(tmp_path, monkeypatch)
    case = GUARD_CASES[name](inputs, monkeypatch)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = case.argv
    if argv[0] == "eval" and "--out" not in argv:   # results never land in the checkout
        argv = argv + ["--out", str(tmp_path / "out" / "results.json")]
    try:
        with case.during():
            assert_one_error_line(name, argv, case.words, case.code, inputs, capsys)
    finally:
        if case.after is not None:
            case.after()


# ----------------------------------------------------------------------------- the lock itself

def test_a_held_lock_refuses_a_second_holder_and_is_gone_after_release(tmp_path):
    from unified_tte.errors import InUse
    from unified_tte.locks import FOLDER_LOCK, lock_folder

    with lock_folder(tmp_path / "run", "tte train"):
        record = json.loads((tmp_path / "run" / FOLDER_LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(InUse, match=rf"run is in use by pid {os.getpid()} on .* \(tte train\); wait"):
            with lock_folder(tmp_path / "run", "tte export"):
                pass
    assert not (tmp_path / "run" / FOLDER_LOCK).exists()
    assert not (tmp_path / "run").exists()   # the lock made the folder and nothing was written there
    with lock_folder(tmp_path / "run", "tte train"):   # free again
        pass


def test_a_stale_lock_of_a_dead_process_is_taken_over_by_name(tmp_path):
    from unified_tte.locks import FOLDER_LOCK, lock_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    write(run / FOLDER_LOCK, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "tte train",
                                         "since": time.time() - 60}))
    with pytest.warns(UserWarning, match=rf"took over a stale lock of pid {dead.pid} .*that process is gone"):
        with lock_folder(run, "tte train"):
            assert json.loads((run / FOLDER_LOCK).read_text())["pid"] == os.getpid()


def test_a_lock_recorded_on_another_host_is_refused_not_guessed(tmp_path):
    from unified_tte.errors import InUse
    from unified_tte.locks import FOLDER_LOCK, lock_folder

    write(tmp_path / "run" / FOLDER_LOCK, json.dumps({"host": "gpu-node-7", "pid": 4242, "command": "tte train",
                                                      "since": time.time()}))
    with pytest.raises(InUse, match=r"pid 4242 on gpu-node-7 .*cannot tell whether that process still runs"):
        with lock_folder(tmp_path / "run", "tte train"):
            pass


def test_a_reader_of_a_read_only_run_folder_goes_on_when_no_writer_holds_it(tmp_path):
    from unified_tte.locks import lock_folder

    folder = immutable(tmp_path / "run")
    try:
        with lock_folder(folder, "tte export", read_only=True):
            pass
        with pytest.raises(PermissionError):
            with lock_folder(folder, "tte train"):
                pass
    finally:
        subprocess.run(["chattr", "-i", str(folder)])


# ----------------------------------------------------------------------------- export guards

def test_export_never_writes_into_a_run_folders_own_files(tmp_path, capsys):
    from unified_tte import UnifiedTTE

    run = run_dir(tmp_path)
    before = snapshot(run)
    for out, extra in ((run, ["--overwrite"]), (run, []), (run / "think", ["--overwrite"]),
                       (run / "checkpoints" / "x", [])):
        assert main(["export", str(run), "--out", str(out)] + extra) == 2
        assert "training run folder" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(["export", str(run), "--out", str(run / "export")]) == 0   # a fresh subfolder is fine
    UnifiedTTE.from_checkpoint(run)   # the run still reads as a run
    UnifiedTTE.from_checkpoint(run / "export")
    assert main(["export", str(run), "--out", str(run / "export")]) == 0   # and re-exports


def test_export_overwrite_never_follows_a_symlink_out_of_the_folder(tmp_path, capsys):
    run = run_dir(tmp_path)
    user = write(tmp_path / "userdir" / "mine.txt", "keep me").parent
    out = tmp_path / "ckpt" / "symt"
    out.mkdir(parents=True)
    (out / "think").symlink_to(Path("..") / ".." / "userdir")
    before = snapshot(tmp_path)
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    assert "symt/think is a symbolic link" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and sorted(p.name for p in user.iterdir()) == ["mine.txt"]


# ----------------------------------------------------------------------------- resume guards and the log

def tiny_run(run, **fields):
    from unified_tte.train.recipe import recipe_from_dict

    raw = {"run_dir": str(run), "backbone": "tiny", "deepspeed": ZERO2,
           "data": {"train": "digits", "digits": {"max_train_per_task": 4}},
           "think": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-3},
           "embed": {"steps": 3, "batch_size": 4, "gradcache_chunk": None},
           "checkpoint_every": 1, "keep_checkpoints": None, "progress_bar": False, "wandb": {"mode": "disabled"}}
    for key, value in fields.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return recipe_from_dict(raw, "test recipe")


def steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_new_steps_for_a_finished_stage(tmp_path):
    from unified_tte import train as T

    run = tmp_path / "run"
    T.train(tiny_run(run, stop_after=4))   # think finished at step 3, embed stopped at step 4
    before = snapshot(run)
    for think_steps in (1, 10):
        with pytest.raises(T.TrainError, match=rf"think.steps was 3 .* is {think_steps} now, but stage think has "
                                               r"finished .*step_4.*the steps of the stages after embed"):
            T.train(tiny_run(run, think={"steps": think_steps}, keep_checkpoints=5), resume=True)
    assert snapshot(run) == before
    # what may change does: the stage the checkpoint is in grows, the numbering stays
    T.train(tiny_run(run, embed={"steps": 4}), resume=True)
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6, 7]
    T.train(tiny_run(run, embed={"steps": 4}), resume=True)   # a finished run resumed: nothing left to do
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6, 7]
    state = json.loads((run / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert (state["stage"], state["stage_step"]) == ("think", 3)


def test_a_fresh_start_after_a_failed_run_logs_one_run(tmp_path, monkeypatch):
    import itertools

    from unified_tte import train as T
    from unified_tte.model import UnifiedTTE

    real, micro_batches = UnifiedTTE.sft_loss, itertools.count(1)
    infinite_at_step_2 = lambda self, *a, **k: real(self, *a, **k) * (float("inf") if next(micro_batches) == 3 else 1)  # noqa: E731
    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(UnifiedTTE, "sft_loss", infinite_at_step_2)   # no good checkpoint yet at step 2
        with pytest.raises(T.NonFiniteLoss, match="no good checkpoint"):
            T.train(tiny_run(run, stages=["think"], checkpoint_every=0))
    assert steps_logged(run) == [1] and not T.checkpoints(run)
    T.train(tiny_run(run, stages=["think"], checkpoint_every=0))
    assert steps_logged(run) == [1, 2, 3]   # one run: step 1 once
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl.1").read_text().splitlines()] == [1]


# ----------------------------------------------------------------------------- trace settings

class Reasoner:
    """Traces whose length follows max_new_tokens, like a real decoder's."""

    def think(self, inputs, max_new_tokens=128, do_sample=False):
        from types import SimpleNamespace

        return SimpleNamespace(traces=[f"<think>{'x' * max_new_tokens}</think> {x.text[:2]}" for x in inputs])


def test_a_trace_resume_with_other_settings_is_refused_unless_mixed_knowingly(tmp_path):
    from unified_tte.data import DataError
    from unified_tte.data.schema import TrainRow
    from unified_tte.model.inputs import TTEInput
    from unified_tte.tracegen import generate_traces

    rows = [TrainRow(f"r{i}", TTEInput(f"q{i}"), TTEInput(f"p{i}"), task="t") for i in range(8)]
    out = tmp_path / "t.jsonl"
    generate_traces(Reasoner(), rows, out, batch_size=2, max_new_tokens=32, limit=4, progress=False)
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"t.jsonl line 1: written with other generation settings "
                                        r"\(max_new_tokens=32\) than this run's \(max_new_tokens=4\).*--force-mix"):
        generate_traces(Reasoner(), rows, out, batch_size=2, max_new_tokens=4, progress=False)
    assert out.read_bytes() == before
    generate_traces(Reasoner(), rows, out, batch_size=2, max_new_tokens=32, progress=False)   # same settings: resumes
    rows_written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows_written] == [f"r{i}" for i in range(8)]
    assert {r["gen"]["max_new_tokens"] for r in rows_written} == {32}
    generate_traces(Reasoner(), rows + [TrainRow("r8", TTEInput("q8"), TTEInput("p8"))], out, max_new_tokens=4,
                    progress=False, force_mix=True)
    assert json.loads(out.read_text().splitlines()[-1])["gen"]["max_new_tokens"] == 4


def test_trace_settings_name_the_reasoner_by_its_weights():
    from unified_tte import UnifiedTTE
    from unified_tte.model.zoo import tiny_qwen2vl
    from unified_tte.testing import randomize_adapters
    from unified_tte.tracegen import generation_settings

    tte = UnifiedTTE(tiny_qwen2vl())
    first = generation_settings(tte, 16, True, None)
    assert first == generation_settings(UnifiedTTE(tiny_qwen2vl()), 16, True, None)   # the same model again
    randomize_adapters(tte, adapters=("embed",))
    assert generation_settings(tte, 16, True, None) == first   # the embed adapter writes no trace
    randomize_adapters(tte, adapters=("think",))
    assert generation_settings(tte, 16, True, None)["model"] != first["model"]


# ----------------------------------------------------------------------------- inputs

def test_an_exif_rotated_photo_goes_in_as_it_is_displayed(tmp_path):
    from unified_tte.model.media import open_image

    stored = Image.new("RGB", (80, 40), (10, 200, 30))
    stored.paste((250, 0, 0), (0, 0, 8, 8))   # a red corner at the stored top left
    exif = Image.Exif()
    exif[0x0112] = 6                           # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = open_image(str(tmp_path / "phone.jpg"), 0)
    assert shown.size == (40, 80)
    assert shown.getpixel((36, 3))[0] > 200    # the corner is at the displayed top right
    with Image.open(tmp_path / "phone.jpg") as im:
        assert open_image(im, 0).size == (40, 80)   # a PIL image given directly: the same rule


def test_the_truncation_warning_names_the_row():
    from unified_tte import UnifiedTTE
    from unified_tte.data.schema import TrainRow
    from unified_tte.model.inputs import TTEInput
    from unified_tte.model.zoo import tiny_qwen2vl

    tte = UnifiedTTE(tiny_qwen2vl())
    tte.encoder.max_length = 64
    row = TrainRow("ImageNet_1K:17", TTEInput("word " * 200), TTEInput("a tench"))
    with pytest.warns(UserWarning, match=r"input 1 \(row ImageNet_1K:17 query\): prompt exceeds max_length=64"):
        tte.encoder.encode([TTEInput("short"), row.qry])


@pytest.mark.parametrize("call, words", [
    (lambda tte, x: tte.think_then_embed(x, max_new_tokens=2.5), ["max_new_tokens", "2.5"]),
    (lambda tte, x: tte.embed(x + [__import__("unified_tte").TTEInput("a\ud800b")]), ["input 1", "'\\ud800'",
                                                                                         "character 1", "surrogate"]),
])
def test_api_bad_values_are_named_input_errors(call, words):
    from unified_tte import TTEInput, UnifiedTTE
    from unified_tte.errors import InputError
    from unified_tte.model.zoo import tiny_qwen2vl

    with pytest.raises(InputError) as info:
        call(UnifiedTTE(tiny_qwen2vl()), [TTEInput("fine")])
    assert all(w in str(info.value) for w in words), str(info.value)


def test_doctor_names_a_bad_kernel_backend_before_any_self_test(monkeypatch):
    from unified_tte.tools import doctor

    monkeypatch.setenv("TTE_KERNEL_BACKEND", "bogus")
    monkeypatch.setattr(doctor, "kernel_checks", lambda device: [doctor.Check("kernel stand-in", True, "")])
    monkeypatch.setattr(doctor, "forward_checks", lambda device: [])
    report, text, code = doctor.run("cpu")
    names = [c["name"] for c in report["checks"]]
    failed = [c for c in report["checks"] if not c["ok"]]
    assert code == 1 and [c["name"] for c in failed] == [names[1]] and names[2] == "kernel stand-in"
    assert "TTE_KERNEL_BACKEND" in failed[0]["detail"] and "bogus" in failed[0]["detail"]


# ----------------------------------------------------------------------------- real processes

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path), "OMP_NUM_THREADS": "1",
             "TTE_DEBUG": "0", "WANDB_MODE": "disabled"}


def write_recipe(folder: Path, run: Path) -> Path:
    raw = {"run_dir": str(run), "backbone": "tiny", "deepspeed": ZERO2, "seed": 0,
           "data": {"train": "digits", "digits": {"max_train_per_task": 4}},
           "think": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-3, "warmup_steps": 1},
           "embed": {"steps": 16, "batch_size": 8, "gradcache_chunk": 4, "lr": 1e-3},
           "checkpoint_every": 1, "keep_checkpoints": None, "progress_bar": False, "wandb": {"mode": "disabled"}}
    return write(folder / f"{run.name}.yaml", yaml.safe_dump(raw))


def tte_train(recipe_path: Path, *extra, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unified_tte.cli", "train", str(recipe_path), *extra], cwd=REPO,
                            env=CHILD_ENV, start_new_session=True, **popen)


def outcome(run: Path) -> tuple[list, dict]:
    """What must not differ from a solo run: every logged (step, stage, loss, grad_norm, lr), and
    the bytes of both adapters."""
    log = [(r["step"], r["stage"], r["loss"], r["grad_norm"], r["lr"])
           for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    adapters = {rel: (run / rel).read_bytes() for rel in ("think/adapter_model.safetensors", "embed/adapter_model.safetensors")}
    return log, adapters


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("solo")
    proc = tte_train(write_recipe(folder, folder / "run"), stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return outcome(folder / "run")


@pytest.mark.slow
def test_a_second_tte_train_into_a_run_in_use_exits_2_at_once_and_the_first_is_untouched(tmp_path, solo):
    run = tmp_path / "run"
    first = tte_train(write_recipe(tmp_path, run), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "recipe.yaml").exists():   # it has started (and, with the lock, holds the folder)
        assert first.poll() is None and time.time() < deadline, "the first run never started"
        time.sleep(0.1)
    other = write_recipe(tmp_path / "other", run)   # the same run_dir, another seed and lr
    other.write_text(other.read_text().replace("seed: 0", "seed: 1").replace("lr: 0.002", "lr: 0.01"))
    started = time.time()
    second = subprocess.run([sys.executable, "-m", "unified_tte.cli", "train", str(other)], cwd=REPO, env=CHILD_ENV,
                            capture_output=True, text=True, timeout=300)
    seconds = time.time() - started
    _, first_err = first.communicate(timeout=600)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(f"tte train: error: {run} is in use by pid {first.pid}")
    assert seconds < 30, f"the second run took {seconds:.0f} s to be refused"
    assert first.returncode == 0, first_err[-3000:]
    assert outcome(run) == solo
    assert "seed: 0" in (run / "recipe.yaml").read_text() and not (run / ".tte.lock").exists()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical_to_a_solo_run(tmp_path, solo):
    """The whole process group is killed with SIGKILL at seeded random moments (a stale lock, a
    pending checkpoint, a cut metrics line are what it leaves); each restart is `--resume`. The
    moments follow the run's progress, not the clock (a fast machine finishes a clock-timed run
    before the kill): once during start-up, then after seeded step counts of the 20 logged steps
    (think 4 + embed 16), each plus a seeded fraction of a second into the next step."""
    run = tmp_path / "run"
    recipe_path = write_recipe(tmp_path, run)
    rng = random.Random(23)
    targets = [0] + sorted(rng.sample(range(2, 19), 4))   # metrics lines written before the kill
    metrics = run / "metrics.jsonl"
    killed = 0
    for target in targets:
        proc = tte_train(recipe_path, "--resume", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        started = run / "recipe.yaml"
        while proc.poll() is None and time.time() < deadline and not (
                started.exists() and (metrics.read_bytes().count(b"\n") if metrics.exists() else 0) >= target):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
    assert killed >= 4, f"only {killed} of the {len(targets)} runs were still running when the kill came"
    final = tte_train(recipe_path, "--resume", stderr=subprocess.PIPE, text=True)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert outcome(run) == solo
