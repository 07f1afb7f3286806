"""The one-shot GPU check: what a bare one-GPU machine with no network can tell about this project
in under 8 minutes. Run through tests/gpu/run_gpu_check.sh, which installs the carried wheels and
the project first:

    bash tests/gpu/run_gpu_check.sh --out "$OUT"               # on the GPU machine
    bash tests/gpu/run_gpu_check.sh --cpu-smoke --out DIR      # every section, tiny sizes, on CPU

Sections, in order (the kernels last: their figures are in docs/results/log.md already), each in its own
process with its own time box; a section that fails or runs out of time is recorded and the next
one runs. Output (at most 8 files, flat):

    env             python, the packages that matter, nvidia-smi                 env.txt
    doctor          tte doctor: versions, devices, self-test                      doctor.txt
    pytest          the gpu tests (tests/gpu/) and the Triton kernel tests        pytest_gpu.txt
    bench           tte bench on the Qwen2-VL-2B shape (random weights, bf16,
                    batch 1, query 512, trace 64): activated, merged (--merge-
                    think, the serving path) and two_model with the CUDA-graph
                    loop (the embed step graph-replayed too; the table gives it
                    in decode steps); then activated with the graph and the
                    compiled loop in one run (against generate and the bandwidth
                    bound; its warm-up compiles); then activated, eager loop       tte_bench.md
    kernels         python -m tte_kernels.bench, InfoNCE fwd+bwd at B = N =
                    16384 and 65536, D 1536, bf16, reference vs Triton            kernels_bench.md
    summary.json    each section's status, seconds and figures; log.txt the running log

A section gets its own cap or what `--budget` (default 460 s) has left after keeping 30 s for
each section still to come, whichever is less. Everything is flushed as it goes, so
a run killed from outside still leaves the sections that finished.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESERVE_S = 30


def sections(smoke: bool, work: Path) -> list[dict]:
    """(name, cap seconds, commands, output file) of each section; --cpu-smoke shrinks every size."""
    py = sys.executable
    tte = [py, "-m", "unified_tte.cli"]
    if smoke:
        kernels = [py, "-m", "tte_kernels.bench", "--device", "cpu", "--sizes", "256", "--dim", "64",
                   "--repeats", "1", "--backends", "ref,chunked", "--out", str(work / "kernels")]
        # static is the graph loop's CPU twin; compiled runs inductor's C++ here
        bench = [tte + ["bench", "--quick", "--decode", "static", "--modes", "activated,merged,two_model",
                        "--out", str(work / "bench_fast")],
                 tte + ["bench", "--quick", "--decode", "static,compiled", "--modes", "activated",
                        "--out", str(work / "bench_compiled")],
                 tte + ["bench", "--quick", "--decode", "eager", "--modes", "activated", "--no-generate",
                        "--out", str(work / "bench_eager")]]
        doctor_device = "cpu"
    else:
        kernels = [py, "-m", "tte_kernels.bench", "--device", "cuda", "--sizes", "16384,65536", "--dim", "1536",
                   "--dtype", "bfloat16", "--repeats", "2", "--backends", "ref,triton", "--timeout", "60",
                   "--out", str(work / "kernels")]
        case = ["--backbone", "qwen2vl-2b-shape", "--dtype", "bf16", "--batch-sizes", "1", "--query-lens", "512",
                "--trace-lens", "64"]
        # Should a capture fail, the log warns and the table's loop column says what ran.
        # tests/gpu/test_gpu_decode.py holds both loops and the graph-replayed embed step to the eager ones.
        bench = [tte + ["bench", *case, "--repeats", "3", "--decode", "graph", "--modes", "activated,merged,two_model",
                        "--out", str(work / "bench_fast")],
                 tte + ["bench", *case, "--repeats", "3", "--decode", "graph,compiled", "--modes", "activated",
                        "--out", str(work / "bench_compiled")],
                 tte + ["bench", *case, "--repeats", "2", "--decode", "eager", "--modes", "activated",
                        "--no-generate", "--out", str(work / "bench_eager")]]
        doctor_device = "cuda"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "--durations=15", "tests/gpu"]
    if not smoke:
        pytest.append("tests/test_kernels_triton.py")  # on CUDA it runs the real kernels in-process
    env_report = [py, "-c", ENV_REPORT]
    return [
        {"name": "env", "cap": 20, "commands": [env_report], "file": "env.txt"},
        {"name": "doctor", "cap": 80, "commands": [tte + ["doctor", "--device", doctor_device, "--json",
                                                         str(work / "doctor.json")]], "file": "doctor.txt"},
        {"name": "pytest", "cap": 150, "commands": [pytest], "file": "pytest_gpu.txt"},
        {"name": "bench", "cap": 240, "commands": bench, "file": "tte_bench.log"},
        {"name": "kernels", "cap": 60, "commands": [kernels], "file": "kernels_bench.log"},
    ]


ENV_REPORT = r"""
import importlib, os, platform, shutil, subprocess, sys
print("python", platform.python_version(), sys.executable)
before = os.environ.get("TTE_PIP_BEFORE")
if before and os.path.isfile(before):
    wanted = ("torch", "transformers", "peft", "deepspeed", "triton", "flash", "accelerate", "pydantic", "hjson",
              "safetensors", "tokenizers", "torchvision", "setuptools", "typing")
    lines = [l for l in open(before).read().splitlines() if l.lower().startswith(wanted)]
    print("installed before the carried wheels:", ", ".join(lines))
print("imported now (the carried wheels first on the path):")
for name in ("torch", "transformers", "peft", "deepspeed", "triton", "flash_attn", "accelerate", "pydantic",
             "safetensors", "tokenizers", "einops", "numpy", "torchvision", "unified_tte", "tte_kernels"):
    try:
        m = importlib.import_module(name)
        print(f"{name:14} {getattr(m, '__version__', '?'):12} {getattr(m, '__file__', '')}")
    except Exception as exc:
        print(f"{name:14} not importable: {type(exc).__name__}: {str(exc)[:100]}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.device_count())
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
"""


class Check:
    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.start = out, budget, time.monotonic()
        self.summary: dict = {"sections": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.log_file = open(out / "log.txt", "a", buffering=1)

    def log(self, message: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))

    def run(self, section: dict, later: int) -> None:
        name = section["name"]
        cap = max(10.0, min(section["cap"], self.left() - RESERVE_S * later))
        path = self.out / section["file"]
        status, started = "ok", time.monotonic()
        self.log(f"{name}: start, {cap:.0f} s at most -> {path.name}")
        with open(path, "w", buffering=1) as f:
            for command in section["commands"]:
                left = cap - (time.monotonic() - started)
                f.write(f"$ {' '.join(command) if not command[1:2] == ['-c'] else command[0] + ' -c <env report>'}\n")
                f.flush()
                code = self._call(command, f, left)
                f.write(f"[exit {code}]\n")
                if code != 0 and status == "ok":
                    status = "timeout" if code == "timeout" else f"exit {code}"
                if code == "timeout":
                    break
        seconds = round(time.monotonic() - started, 1)
        self.summary["sections"][name] = {"status": status, "seconds": seconds, "output": path.name}
        self.log(f"{name}: {status} in {seconds} s")
        self.save()

    def _call(self, command: list[str], f, timeout: float):
        if timeout <= 1:
            return "timeout"
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its workers too
            proc.wait()
            return "timeout"


def collect(check: Check, work: Path) -> None:
    """Fold the sections' own results into summary.json and the two markdown reports."""
    out, summary = check.out, check.summary
    doctor = work / "doctor.json"
    if doctor.is_file():
        report = json.loads(doctor.read_text())
        summary["doctor"] = {"verdict": report.get("verdict"), "notes": report.get("notes"),
                             "failed": [c["name"] for c in report.get("checks", []) if not c.get("ok")]}
    pytest_out = out / "pytest_gpu.txt"
    if pytest_out.is_file():
        tail = [line for line in pytest_out.read_text().splitlines() if " passed" in line or " failed" in line
                or " skipped" in line or "error" in line.lower()]
        summary["pytest"] = tail[-1] if tail else None
    kernels = []
    jsonl = work / "kernels" / "infonce.jsonl"
    if jsonl.is_file():
        kernels = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    md = work / "kernels" / "infonce.md"
    (out / "kernels_bench.md").write_text(md.read_text() if md.is_file() else
                                          "(no table: see kernels_bench.log)\n" + json.dumps(kernels, indent=1))
    summary["kernels"] = [{k: r.get(k) for k in ("backend", "B", "dtype", "time_median_s", "peak_mem_mib", "error")}
                          for r in kernels]
    tables, rows = [], []
    for name, title in (("bench_fast", "activated, merged and two_model: the fast loop"),
                        ("bench_compiled", "activated: the graph and the compiled loop, one run"),
                        ("bench_eager", "activated, the eager loop")):
        table, results = work / name / "table.md", work / name / "results.jsonl"
        tables.append(f"## {title}\n\n" + (table.read_text() if table.is_file() else "(did not finish)\n"))
        if results.is_file():
            rows += [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    (out / "tte_bench.md").write_text("\n".join(tables))
    keep = ("mode", "decode", "decode_loop", "embed_loop", "batch", "query_len", "trace_len", "device_name", "dtype",
            "prefill_p50_ms", "decode_p50_ms", "embed_p50_ms", "e2e_p50_ms", "peak_mem_mb", "embed_decode_steps",
            "decode_tok_s", "generate_tok_s", "decode_vs_generate", "bandwidth_bound_tok_s", "decode_vs_bound",
            "e2e_vs_two_model")
    summary["bench"] = [{k: r.get(k) for k in keep} for r in rows]
    for section, log in (("kernels", "kernels_bench.log"), ("bench", "tte_bench.log")):
        path = out / log  # its tail goes into the summary, the file away (8 files at most come back)
        if path.is_file():
            summary["sections"].setdefault(section, {})["log_tail"] = path.read_text()[-4000:]
            path.unlink()
    check.save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the reports (at most 8 files)")
    p.add_argument("--cpu-smoke", action="store_true", help="every section at tiny sizes on the CPU")
    p.add_argument("--budget", type=float, default=460.0, help="seconds for all sections together (default 460)")
    p.add_argument("--only", default=None, help="comma list of sections to run (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"tte_gpu_check_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget)
    check.summary["mode"] = "cpu-smoke" if args.cpu_smoke else "gpu"
    check.log(f"{check.summary['mode']}: {sys.executable}, repository {ROOT}, work folder {work}")
    chosen = sections(args.cpu_smoke, work)
    if args.only:
        chosen = [s for s in chosen if s["name"] in args.only.split(",")]
    for i, section in enumerate(chosen):
        try:
            check.run(section, later=len(chosen) - i - 1)
        except Exception as exc:  # noqa: BLE001 - the driver itself must never stop the sections after
            check.summary["sections"][section["name"]] = {"status": f"driver error: {exc!r}"}
            check.log(f"{section['name']}: driver error {exc!r}")
    try:
        collect(check, work)
    except Exception as exc:  # noqa: BLE001
        check.log(f"collecting the results failed: {exc!r}")
    statuses = {name: s.get("status") for name, s in check.summary["sections"].items()}
    check.log(f"done in {time.monotonic() - check.start:.0f} s: {statuses}")
    print(json.dumps({"sections": statuses, "doctor": check.summary.get("doctor", {}).get("verdict"),
                      "pytest": check.summary.get("pytest")}, indent=1))
    for name in ("kernels_bench.md", "tte_bench.md"):
        if (out / name).is_file():
            print(f"\n===== {name}\n" + (out / name).read_text()[:6000])
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
