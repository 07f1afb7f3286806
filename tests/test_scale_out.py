"""Evaluation and trace generation sharded over ranks (torchrun, gloo on CPU): two ranks give
exactly the one-process scores and trace ids; a SIGKILLed evaluation resumes from its embedding
cache with the same scores; the 2-rank throughput benchmark prints its figures."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env



def tte(args, ranks=1, timeout=300, **kw):
    if ranks == 1:
        cmd = [sys.executable, "-m", "unified_tte.cli"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--standalone", "-m", "unified_tte.cli"] + args
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run folder: random think and embed adapters on the built-in tiny backbone."""
    from unified_tte.tools.eval_bench import tiny_run

    return tiny_run(tmp_path_factory.mktemp("run"), seed=4)


EVAL = ["--tasks", "digits/classify,digits/next_number", "--max-queries", "10", "--max-new-tokens", "4",
        "--batch-size", "3", "--no-progress"]


def scores(path):
    res = json.loads(Path(path).read_text())
    return {name: {k: m[k] for k in ("hit@1", "ndcg@5", "mrr", "n")} | {"examples": m.get("examples")}
            for name, m in res["tasks"].items()}


def test_two_ranks_evaluate_exactly_like_one_process(run_dir, tmp_path):
    one = tte(["eval", str(run_dir), *EVAL, "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = tte(["eval", str(run_dir), *EVAL, "--out", str(tmp_path / "two.json")], ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert scores(tmp_path / "one.json") == scores(tmp_path / "two.json")
    assert json.loads((tmp_path / "two.json").read_text())["settings"]["ranks"] == 2
    assert two.stdout.count("| digits/classify |") == 1          # rank 0 alone prints the table


def test_a_sigkilled_evaluation_resumes_from_its_cache_with_the_same_scores(run_dir, tmp_path):
    args = ["eval", str(run_dir), *EVAL, "--batch-size", "2", "--cache-dir", str(tmp_path / "cache")]
    clean = tte(args[:-2] + ["--out", str(tmp_path / "clean.json")])
    assert clean.returncode == 0, clean.stderr[-3000:]
    cmd = [sys.executable, "-m", "unified_tte.cli", *args, "--out", str(tmp_path / "killed.json")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((tmp_path / "cache").rglob("*.npz"))) < 4:
        assert proc.poll() is None, "the evaluation finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((tmp_path / "cache").rglob("*.npz")))
    assert written >= 4 and not (tmp_path / "killed.json").exists()
    resumed = tte(args + ["--out", str(tmp_path / "resumed.json")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert scores(tmp_path / "resumed.json") == scores(tmp_path / "clean.json")
    reused = sum(m.get("cached_items", 0) for m in json.loads((tmp_path / "resumed.json").read_text())["tasks"].values())
    assert reused >= 2 * (written - 1)                 # every complete batch read back, not recomputed
    again = tte(args + ["--out", str(tmp_path / "again.json")], ranks=2)   # a full cache, on 2 ranks
    assert again.returncode == 0, again.stderr[-3000:]
    assert scores(tmp_path / "again.json") == scores(tmp_path / "clean.json")


def test_two_ranks_write_the_one_process_traces_with_no_id_lost_or_repeated(run_dir, tmp_path):
    args = ["traces", "--model", str(run_dir), "--data", "digits", "--limit", "13", "--batch-size", "2",
            "--max-new-tokens", "3", "--no-progress"]
    one = tte(args + ["--out", str(tmp_path / "one.jsonl")])
    assert one.returncode == 0, one.stderr[-3000:]
    half = tte(args[:-1] + ["--out", str(tmp_path / "two.jsonl"), "--limit", "5"], ranks=2)  # then resumed
    assert half.returncode == 0, half.stderr[-3000:]
    two = tte(args + ["--out", str(tmp_path / "two.jsonl")], ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda p: [json.loads(line) for line in Path(p).read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "one.jsonl"), read(tmp_path / "two.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len({r["id"] for r in b}) == 13
    assert {r["id"]: r["trace"] for r in a} == {r["id"]: r["trace"] for r in b}
    assert not list(tmp_path.glob("two.jsonl.rank*"))               # parts merged and removed
    assert "wrote 8 trace(s); 5 already there" in two.stdout


def test_the_two_rank_throughput_benchmark_prints_its_figures(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unified_tte.tools.eval_bench", "--run", str(run_dir),
                           "--queries", "6", "--rounds", "1", "--out", str(tmp_path / "bench.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "items/s" in proc.stdout and "2 ranks / 1 rank" in proc.stdout
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["speedup"] > 0 and len(res["runs"]) == 2
