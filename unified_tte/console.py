"""What a `tte` command prints: its own progress lines, and third-party noise kept out of them.

    from unified_tte import console
    console.quiet_third_party()                  # every command does this first (errors.command)
    phases = console.Phases("demo", total=11)
    with phases.phase("training think", total=250, unit="steps") as bar:
        for _ in range(250):
            bar.update(1)
    # -> [demo 12:01:02] 2/11 training think: 120/250 steps, 0:41 elapsed, ETA 0:44

Quiet by default: Hugging Face's progress bars ("Loading weights", "Writing model shards"),
transformers' and DeepSpeed's info logs and DeepSpeed's op-build prints stay hidden; warnings
and errors still show. `tte --verbose <command>` (or TTE_VERBOSE=1, which child processes
inherit) shows everything. A progress line is redrawn in place on a terminal; in a log file
it is written when its phase ends, and at most once a minute while a long phase runs.
This module is a leaf like `errors`: every layer may import it, it imports nothing of ours.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time

VERBOSE_ENV = "TTE_VERBOSE"
LOG_EVERY_S = 60.0      # a progress line in a log file: at most this often while a phase runs
REDRAW_EVERY_S = 0.5    # on a terminal
_quieted: list[str] = []   # the environment settings quiet_third_party made (set_verbose undoes them)


def verbose_enabled() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_third_party() -> None:
    """Hide third-party progress bars and info logs unless verbose (warnings and errors still
    show). Environment settings come first so child processes (bench workers, torchrun ranks)
    and libraries not yet imported start quiet too."""
    if not torch_sees_cuda():
        # DeepSpeed is imported by transformers' save_pretrained (through accelerate) long before
        # training; without this it warns "Setting accelerator to CPU ..." on every CPU machine.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if verbose_enabled():
        return
    for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"),   # read at import by hub and transformers
                       ("TRANSFORMERS_VERBOSITY", "warning")):
        if key not in os.environ:
            os.environ[key] = value
            _quieted.append(key)
    if "transformers" in sys.modules:   # already imported (an in-process caller): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for name in ("DeepSpeed", "torch.distributed.elastic"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))


def set_verbose() -> None:
    """Show third-party output from here on (a command's own --verbose), undoing the quieting."""
    os.environ[VERBOSE_ENV] = "1"
    while _quieted:
        os.environ.pop(_quieted.pop(), None)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_info()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    logging.getLogger("DeepSpeed").setLevel(logging.INFO)


def torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@contextlib.contextmanager
def quiet_stdout():
    """Hold back what third-party code prints to stdout (DeepSpeed prints "... built successfully"
    for every op it loads); replayed on stderr if the block fails, shown as is when verbose."""
    if verbose_enabled():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


@contextlib.contextmanager
def module_bars_hidden(module: str):
    """Within the block, a module that draws plain tqdm bars (`from tqdm.auto import tqdm` at its
    top) draws none, unless verbose: its `tqdm` name is bound to a disabled tqdm meanwhile."""
    import functools
    import importlib

    if verbose_enabled():
        yield
        return
    target = importlib.import_module(module)
    original = getattr(target, "tqdm", None)
    if original is None:
        yield
        return
    target.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        target.tqdm = original


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """One line for one phase: what, how far (n/total unit), elapsed and ETA."""

    def __init__(self, prefix: str, what: str, total: int | None = None, unit: str = "items",
                 stream=None):
        self.prefix, self.what, self.total, self.unit = prefix, what, total, unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.note = ""          # said after the line when the phase ends (a result, a path)
        self.done, self.started = 0, time.perf_counter()
        self._drawn = self._written = self.started
        self.closed = False

    def line(self, final: bool = False) -> str:
        elapsed = time.perf_counter() - self.started
        text = f"[{self.prefix} {time.strftime('%H:%M:%S')}] {self.what}"
        if self.total:
            text += f": {min(self.done, self.total)}/{self.total} {self.unit}"
        text += f", {_clock(elapsed)} elapsed" if self.total else f" ({_clock(elapsed)})"
        if self.total and not final and 0 < self.done < self.total:
            text += f", ETA {_clock(elapsed / self.done * (self.total - self.done))}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and now - self._drawn >= REDRAW_EVERY_S:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self._drawn = now
        elif not self.tty and now - self._written >= LOG_EVERY_S:
            print(self.line(), file=self.stream, flush=True)
            self._written = now

    def close(self, note: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        text = self.line(final=True) + (f"; {note}" if note else "")
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


class Phases:
    """Numbered phases of a long command: `phase(what)` yields its Progress line ("3/11 ...")."""

    def __init__(self, prefix: str, total: int, stream=None):
        self.prefix, self.total, self.stream, self.index = prefix, total, stream, 0

    @contextlib.contextmanager
    def phase(self, what: str, total: int | None = None, unit: str = "items"):
        self.index += 1
        bar = Progress(self.prefix, f"{self.index}/{self.total} {what}", total, unit, self.stream)
        try:
            yield bar
        finally:
            bar.close(bar.note)

    def say(self, what: str) -> None:
        """A line that is not a phase (a finding, a reuse)."""
        print(f"[{self.prefix} {time.strftime('%H:%M:%S')}] {what}", file=self.stream or sys.stdout, flush=True)
