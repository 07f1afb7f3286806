"""Measurement shared by the package's benchmarks and tools (`tte bench`, `python -m
unified_tte.tools.train_bench`, `tte plan --measure`, `tte doctor`, the demo's bench): peak memory,
percentiles, the machine's name, and workers in fresh processes. It imports only the standard
library, and torch inside the functions that need it. (The kernels' own op benchmark,
`python -m tte_kernels.bench`, times itself: tte_kernels imports nothing of unified_tte.)

    from unified_tte.tools.measure import PeakMemory, current_memory_mb, machine_name, summary, trim

    trim()                                   # gc + malloc_trim, so the RSS shows what is live
    base = current_memory_mb(device)         # MB: resident set (CPU) or allocated (CUDA)
    with PeakMemory(device, base) as mem:
        run()
    mem.peak_mb, mem.method                  # the peak above base, and how it was measured
    summary(times)                           # {"p20": ..., "p50": ..., "p80": ..., "p90": ...}
    machine_name()                           # "NVIDIA H100 80GB HBM3" or "2-core AMD EPYC 7B13"

Workers: the parent starts `python -m MODULE --worker JSON`; MODULE's main, given --worker, does
the job and answers with reply() (a tagged JSON line on stdout; other output is ignored).

    # parent, a long-lived worker driven by commands (one JSON object a line on its stdin)
    worker = Worker("pkg.bench", job, name="activated", log=out / "worker_activated.log")
    meta = worker.read()                     # the child's first reply
    times = worker.ask(cmd="step")           # one command, one reply
    worker.close()                           # sends {"cmd": "quit"}, kills it after 30 s
    # parent, a worker with one answer (it must also exit 0)
    row = run_in_fresh_process("pkg.bench", spec, timeout=600)

    # child
    reply({"ready": True})
    for command in read_commands(): ...

A worker that exits, is killed or runs past its timeout before replying raises WorkerError,
whose message ends with the tail of the worker's stderr (its log file, or a temporary file).

Peak memory, per device:
  * CPU: the kernel's resident high-water mark (VmHWM) is reset through /proc/self/clear_refs
    when the block starts and read when it ends. Where clear_refs is not writable, a thread
    samples the RSS every millisecond instead. Either way freed heap is first handed back to the
    system (malloc_trim) so the reset starts from what is live.
  * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

MB = 2 ** 20
REPLY_TAG = "@@measure "  # starts a worker's reply line; anything else it prints is ignored
TAIL_CHARS = 3000  # how much of a failed worker's stderr its error carries
QUIT_WAIT_S = 30
SUMMARY_PERCENTILES = (20, 50, 80, 90)


# ---------------------------------------------------------------------------------------- device
def is_cuda(device) -> bool:
    """True for "cuda", "cuda:1" or a torch.device of type cuda (no torch call)."""
    return str(device).split(":")[0] == "cuda"


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu": every benchmark's default."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    """Wait for the GPU's queued work, so a timer edge falls after it; nothing on CPU."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def machine_name(device=None) -> str:
    """The GPU's name, or "N-core <CPU model>": what a reported figure was measured on.
    device=None means the device a benchmark would pick (default_device())."""
    if device is None:
        device = default_device()
    if is_cuda(device):
        import torch

        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {cpu}"


# ---------------------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("VmHWM is not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def trim() -> None:
    """Collect garbage and hand freed heap back to the system, so the RSS reflects what is live."""
    gc.collect()
    try:  # glibc keeps freed heap mapped until asked
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_memory_mb(device) -> float:
    """MB in use now: the resident set on CPU, torch's allocated memory on CUDA."""
    if is_cuda(device):
        import torch

        return torch.cuda.memory_allocated(device) / MB
    return _rss_mb()


class PeakMemory:
    """Peak memory of a block in MB above `baseline_mb` (see the module docstring for how).

    `method` names what was used: "VmHWM after clear_refs", "RSS sampled every 1 ms" or
    "cuda.max_memory_allocated". After the block, `peak_mb` holds the figure.
    """

    def __init__(self, device, baseline_mb: float):
        self.device, self.baseline = device, baseline_mb
        if is_cuda(device):
            self.method = "cuda.max_memory_allocated"
        else:
            self.method = "VmHWM after clear_refs" if _reset_hwm() else "RSS sampled every 1 ms"
        self.peak_mb: float | None = None
        self._stop = self._thread = None
        self._sampled = 0.0

    def __enter__(self):
        trim()
        if is_cuda(self.device):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("VmHWM"):
            _reset_hwm()
        else:
            self._sampled = _rss_mb()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if is_cuda(self.device):
            import torch

            peak = torch.cuda.max_memory_allocated(self.device) / MB
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _rss_mb())
        else:
            peak = _hwm_mb()
        self.peak_mb = peak - self.baseline
        return False


# ---------------------------------------------------------------------------------------- statistics
def percentile(xs, p: float) -> float:
    """The p-th percentile (0 <= p <= 100) of xs, linear between the closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        raise ValueError("percentile of an empty list: time at least one run")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile p={p} is outside [0, 100]")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs) -> dict[str, float]:
    """{"p20", "p50", "p80", "p90"} of xs: the median and the spread a benchmark reports."""
    return {f"p{p}": percentile(xs, p) for p in SUMMARY_PERCENTILES}


# ---------------------------------------------------------------------------------------- workers
class WorkerError(RuntimeError):
    """A worker exited, was killed or ran out of time before it replied.

    `why` says which ("exited with code 1", "timed out after 60 s", ...), `tail` is the end of
    its stderr; the message holds both.
    """

    def __init__(self, name: str, why: str, tail: str, log=None):
        self.name, self.why, self.tail, self.log = name, why, tail, log
        where = f"the end of {log}" if log else "the end of its stderr"
        super().__init__(f"the {name} worker {why}; {where}:\n{tail}")


class Worker:
    """The parent's handle on one `python -m MODULE --worker JSON` process.

    Args:
        module: the module to run; its main must handle `--worker JSON` (see the module docstring).
        spec: the job, JSON-serialisable; the child gets it as the --worker argument.
        name: what messages call the worker (default: the module).
        log: a file for the child's stderr (default: a temporary file, read back on failure).
        env: environment variables to set in the child; a value of None removes the variable.
        timeout: seconds the child may live before it is killed (default: no limit).
    """

    def __init__(self, module: str, spec: dict, *, name: str | None = None, log=None,
                 env: dict | None = None, timeout: float | None = None):
        self.name, self.log, self.timeout = name or module, log, timeout
        child_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = str(value)
        self._stderr = open(log, "w+") if log else tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=child_env)
        self._expired = False
        self._timer = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        self._expired = True
        self.proc.kill()

    def read(self) -> dict:
        """The child's next reply; WorkerError if it ends (or is killed) before sending one."""
        for line in self.proc.stdout:
            if line.startswith(REPLY_TAG):
                return json.loads(line[len(REPLY_TAG):])
        self.proc.wait()
        raise self._error()

    def send(self, **command) -> None:
        """One command, as a JSON line on the child's stdin."""
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc.wait()
            raise self._error() from None

    def ask(self, **command) -> dict:
        self.send(**command)
        return self.read()

    def _error(self) -> WorkerError:
        code = self.proc.returncode
        if self._expired:
            why = f"timed out after {self.timeout:g} s"
        elif code in (-9, 137):
            why = f"was killed (exit {code}, out of memory?)"
        elif code == 0:
            why = "exited without a reply"
        else:
            why = f"exited with code {code}"
        self._stderr.flush()
        self._stderr.seek(0)
        return WorkerError(self.name, why, self._stderr.read()[-TAIL_CHARS:], self.log)

    def close(self) -> None:
        """Ask a running child to quit, kill it if it has not within 30 s, release its files."""
        if self._timer is not None:
            self._timer.cancel()
        if self.proc.poll() is None:
            try:
                if not self.proc.stdin.closed:
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.flush()
                self.proc.wait(timeout=QUIT_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:  # a pipe the child left with unread data
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_in_fresh_process(module: str, spec: dict, timeout: float | None = None, **options) -> dict:
    """Run `python -m MODULE --worker JSON` to its end and return its one reply.

    WorkerError if it fails, runs past `timeout` seconds, or exits non-zero after replying.
    options: Worker's name, log and env.
    """
    with Worker(module, spec, timeout=timeout, **options) as worker:
        worker.proc.stdin.close()  # a one-shot worker reads no commands
        result = worker.read()
        if worker.proc.wait() != 0:
            raise worker._error()
        return result


def reply(obj: dict) -> None:
    """Answer the parent (in a worker): one tagged JSON line on stdout."""
    print(REPLY_TAG + json.dumps(obj), flush=True)


def read_commands(lines=None):
    """The parent's commands (in a worker): one JSON object per line of `lines`, default stdin."""
    for line in sys.stdin if lines is None else lines:
        if line.strip():
            yield json.loads(line)
