"""Benchmark InfoNCE fwd + bwd: the plain reference against the chunked path (CPU) or Triton (CUDA).

    python -m tte_kernels.bench                                 # B = N in 1024, 4096, 16384; D = 1536
    python -m tte_kernels.bench --sizes 1024 --dim 256 --repeats 2 --out /tmp/bench   # quick look
    python -m tte_kernels.bench --sizes 32768 --backends chunked   # skip the slow / 13 GiB reference
    python -m tte_kernels.bench --device cuda                   # ref vs triton, 1024 ... 32768, bf16

Every measurement runs in a fresh subprocess (run_in_fresh_process), so one case's allocator
state and peak cannot leak into the next. `--repeats` rounds per size; each round
runs every backend once, in turn (ref, chunked, ref, chunked, ...), so a change in machine load
(a shared 2-core box) hits all backends alike. Time: wall clock of loss = info_nce(q, t);
loss.backward(), after `--warmup` untimed runs in the same process; median, p20, p80 over the
rounds. The process CPU time of the same run is reported beside it: on a machine shared with
other jobs it moves far less than the wall clock. Peak memory (peak_memory): the largest over
the rounds, above what the process held once q and t existed (so it counts the
gradients of q and t plus the loss' own working set):
  * CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs; where that is not
    writable, the RSS sampled every millisecond) minus the resident set before the first run.
    glibc's mmap threshold is pinned at 64 KiB in the child (MALLOC_MMAP_THRESHOLD_) so freed
    tensors really leave the resident set.
  * CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the first run.
Output: one JSON line per case (stdout and OUT/infonce.jsonl) and a markdown table with the
backend / reference ratios (OUT/infonce.md). OUT defaults to bench_out/kernels.

It measures with what it needs and no more: tte_kernels imports nothing of unified_tte, so the
package's benchmark harness (unified_tte/tools/measure.py) is not used here.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MMAP_THRESHOLD = 65536
MODULE = "tte_kernels.bench"
ANSWER_TAG = "@@case "  # starts a case process's answer line; anything else it prints is ignored
STDERR_TAIL = 3000      # how much of a failed case's stderr its error carries


# --- measuring ---------------------------------------------------------------------------------

def percentile(xs, p: float) -> float:
    """The p-th percentile of xs, linear between the closest ranks (numpy's default)."""
    import torch

    return float(torch.quantile(torch.tensor(list(xs), dtype=torch.float64), p / 100))


def machine(device: str) -> str:
    """What a row was measured on: the GPU's name, or "N-core <CPU model>"."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            return f"{os.cpu_count()}-core {models[0]}"
    return f"{os.cpu_count()}-core {platform.processor() or 'CPU'}"


def _status_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process, from /proc/self/status (kB there)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict that holds, once the block is done, its peak memory in bytes above what the
    process held as it began ("bytes") and how that was measured ("method"): CUDA's
    max_memory_allocated; on CPU the resident high-water mark (VmHWM) reset through
    /proc/self/clear_refs, or where that is not writable the RSS sampled every millisecond. Freed
    heap is handed back first (gc, malloc_trim), so the start is what is live."""
    import torch

    out = {}
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):   # glibc keeps freed heap mapped until asked
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        out.update(bytes=torch.cuda.max_memory_allocated() - start, method="cuda.max_memory_allocated")
        return
    start = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        highest, done = [start], threading.Event()

        def sample():
            while not done.wait(0.001):
                highest[0] = max(highest[0], _status_bytes("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        yield out
        done.set()
        sampler.join()
        out.update(bytes=max(highest[0], _status_bytes("VmRSS")) - start, method="RSS sampled every 1 ms")
        return
    yield out
    out.update(bytes=_status_bytes("VmHWM") - start, method="VmHWM after clear_refs")


class CaseError(RuntimeError):
    """A case's process failed before it answered: `why` says how, `tail` is the end of its stderr."""

    def __init__(self, name: str, why: str, tail: str):
        self.name, self.why, self.tail = name, why, tail
        super().__init__(f"the {name} case {why}; the end of its stderr:\n{tail}")


def run_in_fresh_process(module: str, spec: dict, timeout: float | None = None, *, name: str,
                         env: dict) -> dict:
    """Run `python -m MODULE --worker JSON` (with `env` added to this environment) to its end and
    return its answer; CaseError if it fails, runs past `timeout` seconds or does not answer."""
    command = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise CaseError(name, f"timed out after {timeout:g} s", stderr[-STDERR_TAIL:]) from None
    answers = [line[len(ANSWER_TAG):] for line in done.stdout.splitlines() if line.startswith(ANSWER_TAG)]
    if done.returncode == 0 and answers:
        return json.loads(answers[-1])
    code = done.returncode
    why = (f"was killed (exit {code}, out of memory?)" if code in (-9, 137) else
           f"exited with code {code}" if code else "exited without an answer")
    raise CaseError(name, why, done.stderr[-STDERR_TAIL:])


# --- the worker: one case, one process ---------------------------------------------------------

def memory_method(device: str, method: str) -> str:
    """The sentence under the table that says how peak memory was measured."""
    if device == "cuda":
        return f"torch.{method} above memory_allocated after inputs were built, fresh process per case"
    return (f"peak RSS ({method}) above the RSS after inputs were built, fresh process per case, "
            "glibc mmap threshold pinned at 64 KiB")


def run_case(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from tte_kernels import info_nce

    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    B, D, backend = spec["size"], spec["dim"], spec["backend"]

    def step(q, t):
        q.grad = t.grad = None  # last run's gradients go before this run's peak
        loss = info_nce(q, t, temperature=spec["temperature"], symmetric=spec["symmetric"], backend=backend,
                        chunk_size=spec.get("chunk_size"))
        loss.backward()
        return loss

    # Warm BLAS thread pools, the autograd engine and (on CUDA) the kernel cache at a small size,
    # so one-off library allocations are not charged to the case.
    small = [F.normalize(torch.randn(256, D, device=device), dim=-1).to(dtype).requires_grad_() for _ in range(2)]
    step(*small)
    del small
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    t = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    sync()
    times, cpu_times = [], []
    loss = None
    with peak_memory(device) as mem:
        for i in range(spec["warmup"] + spec["repeats"]):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(q, t)
            sync()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    peak = mem["bytes"]
    return {
        "op": "info_nce_fwd_bwd", "backend": backend, "B": B, "N": B, "D": D, "dtype": spec["dtype"],
        "device": machine(device), "threads": torch.get_num_threads(), "symmetric": spec["symmetric"],
        "chunk_size": spec.get("chunk_size"), "repeats": len(times), "warmup": spec["warmup"],
        "time_median_s": statistics.median(times), "time_p20_s": percentile(times, 20),
        "time_p80_s": percentile(times, 80), "cpu_time_median_s": statistics.median(cpu_times),
        "peak_mem_bytes": int(peak), "peak_mem_mib": round(peak / 2**20, 1),
        "memory_method": memory_method(device, mem["method"]), "loss": float(loss), "torch": torch.__version__,
    }


# --- the driver ---------------------------------------------------------------------------------

def _spawn(spec: dict, timeout: float | None) -> dict:
    """One case in a fresh process; a failed case becomes a row with an "error"."""
    # The mmap threshold is pinned so freed tensors really leave the resident set (a caller's own
    # setting wins).
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))}
    try:
        return run_in_fresh_process(MODULE, spec, timeout=timeout, name=spec["backend"], env=env)
    except CaseError as exc:
        return {**_ids(spec), "error": f"{exc.why}: {exc.tail.strip()[-800:]}"}


def _ids(spec):
    return {"op": "info_nce_fwd_bwd", "backend": spec["backend"], "B": spec["size"], "N": spec["size"],
            "D": spec["dim"], "dtype": spec["dtype"]}


def _combine(runs: list[dict]) -> dict:
    """One row per case from its rounds: time percentiles over rounds, the largest peak."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    times = [r["time_median_s"] for r in runs]
    peak = max(r["peak_mem_bytes"] for r in runs)
    return {**runs[0], "repeats": len(runs), "time_median_s": statistics.median(times),
            "time_p20_s": percentile(times, 20), "time_p80_s": percentile(times, 80), "times_s": times,
            "cpu_time_median_s": statistics.median(r["cpu_time_median_s"] for r in runs),
            "cpu_times_s": [r["cpu_time_median_s"] for r in runs],
            "peak_mem_bytes": peak, "peak_mem_mib": round(peak / 2**20, 1),
            "peak_mem_mib_per_round": [r["peak_mem_mib"] for r in runs]}


def markdown(rows: list[dict]) -> str:
    ref = {(r["B"], r["D"], r["dtype"]): r for r in rows if r["backend"] == "ref" and "error" not in r}
    out = ["| B = N | D | dtype | backend | time median (s) | p20 (s) | p80 (s) | peak memory (MiB) "
           "| memory vs ref | time vs ref | time vs ref, paired | CPU time (s) | CPU time vs ref |",
           "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['B']} | {r['D']} | {r['dtype']} | {r['backend']} | error: {r['error'][:60]} "
                       "| | | | | | | | |")
            continue
        base = ref.get((r["B"], r["D"], r["dtype"]))
        mem_ratio = time_ratio = paired = cpu_ratio = ""
        if base is not None and r["backend"] != "ref":
            mem_ratio = f"{r['peak_mem_bytes'] / max(base['peak_mem_bytes'], 1):.3f}"
            time_ratio = f"{r['time_median_s'] / base['time_median_s']:.2f}"
            if "cpu_time_median_s" in r and "cpu_time_median_s" in base:
                cpu_ratio = f"{r['cpu_time_median_s'] / base['cpu_time_median_s']:.2f}"
            if r.get("times_s") and len(r["times_s"]) == len(base.get("times_s", [])):
                # Same round = same stretch of machine load: the median of per-round ratios is
                # the steadier figure on a shared machine.
                paired = f"{statistics.median(a / b for a, b in zip(r['times_s'], base['times_s'])):.2f}"
        out.append(f"| {r['B']} | {r['D']} | {r['dtype']} | {r['backend']} | {r['time_median_s']:.3f} "
                   f"| {r['time_p20_s']:.3f} | {r['time_p80_s']:.3f} | {r['peak_mem_mib']:.1f} "
                   f"| {mem_ratio} | {time_ratio} | {paired} | {r.get('cpu_time_median_s', float('nan')):.3f} "
                   f"| {cpu_ratio} |")
    methods = sorted({r["memory_method"] for r in rows if "memory_method" in r})
    out.append("")
    out.extend(f"Peak memory: {m}." for m in methods)
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tte_kernels.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="comma-separated B = N values (default 1024,4096,16384 on CPU; add 32768 on CUDA)")
    p.add_argument("--dim", type=int, default=1536, help="embedding dim D (default 1536, Qwen2-VL-2B)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds per size; each round times every backend once in a fresh process (default 3)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed full-size runs in each process before the timed one (default 0; every "
                        "process already warms up at B = 256)")
    p.add_argument("--backends", default=None, help="comma-separated (default ref,chunked on CPU; ref,triton on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--symmetric", action="store_true", help="time the symmetric (CLIP) loss")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per step of the chunked path (default: auto)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a case is abandoned (default: none)")
    p.add_argument("--out", default="bench_out/kernels", help="folder for infonce.jsonl and infonce.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def resolve(args) -> tuple[str, list[int], list[str], str]:
    """(device, sizes, backends, dtype) from the flags: --device auto is cuda when torch sees a GPU;
    by default CUDA runs B = N up to 32768, ref vs triton, in bfloat16, the CPU up to 16384, ref vs
    chunked, in float32. ValueError for --device cuda without a GPU."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU")
    cuda = device == "cuda"
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1024, 4096, 16384] + ([32768] if cuda else [])
    backends = args.backends.split(",") if args.backends else ["ref", "triton" if cuda else "chunked"]
    return device, sizes, backends, args.dtype or ("bfloat16" if cuda else "float32")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker is not None:
        print(ANSWER_TAG + json.dumps(run_case(json.loads(args.worker))), flush=True)
        return 0
    try:
        device, sizes, backends, dtype = resolve(args)
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "infonce.jsonl"
    rows = []
    with jsonl.open("w") as f:
        for size in sizes:
            samples = {b: [] for b in backends}
            for round_ in range(args.repeats):
                for backend in backends:
                    spec = dict(size=size, dim=args.dim, backend=backend, device=device, dtype=dtype,
                                temperature=args.temperature, symmetric=args.symmetric, chunk_size=args.chunk_size,
                                repeats=1, warmup=args.warmup)
                    print(f"[bench] B=N={size} D={args.dim} {backend} {dtype} on {device}, "
                          f"round {round_ + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
                    samples[backend].append(_spawn(spec, args.timeout))
            for backend in backends:
                row = _combine(samples[backend])
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                f.write(line + "\n")
                f.flush()
    table = markdown(rows)
    (out / "infonce.md").write_text(
        f"# InfoNCE fwd + bwd, {device}, D={args.dim}, {dtype}\n\n`python -m tte_kernels.bench "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n")
    print("\n" + table)
    print(f"\nwrote {jsonl} and {out / 'infonce.md'}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
