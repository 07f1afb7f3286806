"""The project's error types and the one way every `tte` command reports them.

    from unified_tte.errors import DataError
    raise DataError(f"{path} line {n}: field 'qry' must be a string, got int. Fix the row or pass --skip-bad.")

A message says what was wrong, where (file, line/row, field, item index) and what to do. Each
type carries the exit code a command returns for it:

    2  bad input: arguments, recipes, data, checkpoints, a missing extra - fix it and run again
    1  a run that started and failed (a non-finite loss, a worker that died)

`@command("train")` on a command's main function (or `report_errors("train")` around a body)
turns them, and OS errors such as a missing folder, into one line on stderr,
`tte train: error: <message>`, and the exit code; `tte --debug ...` or TTE_DEBUG=1 also prints
the traceback. argparse's own usage errors have the same prefix and exit code 2. Before the
command runs, `@command` quiets third-party progress bars and info logs (`console`; `tte
--verbose` shows them). This module is a leaf: every layer imports it, and it imports only the
other leaf, `console`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

from . import console

BAD_INPUT = 2
RUN_FAILED = 1
DEBUG_ENV = "TTE_DEBUG"


class TTEError(Exception):
    """Base of the project's errors; `exit_code` is what a command returns for it."""
    exit_code = BAD_INPUT


class InputError(TTEError, ValueError):
    """Bad input to the model (an item, an image, a text); the message names the item index."""


class DataError(TTEError, ValueError):
    """Bad input data; the message names the file, the line/row, the field and a fix."""


class RecipeError(TTEError, ValueError):
    """A bad recipe: the message names the file (or override), the key and what to do."""


class CheckpointError(TTEError, ValueError):
    """A checkpoint or run folder that cannot be used; the message names the file and what to do."""


class UnsupportedBackbone(TTEError, ValueError):
    """A model type the forward path has not been proven on."""


class MissingExtra(TTEError, ImportError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, package: str, what: str):
        super().__init__(f"{what} needs {package}, which is not installed: "
                         f"pip install 'unified_tte[{extra}]'")
        self.extra, self.package = extra, package


class SettingError(TTEError, ValueError):
    """An environment variable the package reads holds a value it cannot use; the message names it."""


class InUse(TTEError, RuntimeError):
    """A run folder, trace file or cache another process holds (`unified_tte.locks`); the message
    names the holder (pid, host, since when) and its lock file."""


class RunError(TTEError, RuntimeError):
    """A run that started and cannot go on; the message says why and what to do."""
    exit_code = RUN_FAILED


class TrainError(TTEError, RuntimeError):
    """A training run that cannot start: the recipe, the data and the ranks disagree."""


class NonFiniteLoss(TrainError):
    """A step produced a non-finite loss or update; the run stopped at the last good checkpoint."""
    exit_code = RUN_FAILED
    every_rank = True   # all ranks raise it together; rank 0 reports it


def write_failed(exc: BaseException, path, advice: str) -> RunError:
    """The one-line RunError for a write that failed under `path` (a full disk: OSError, torch's
    "unexpected pos", safetensors' SafetensorError), with the free space there and `advice`."""
    import shutil
    from pathlib import Path

    folder = next((p for p in (Path(path), *Path(path).parents) if p.is_dir()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RunError(f"writing {path} failed ({type(exc).__name__}: {reason}; {free}); {advice}")


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or raise MissingExtra naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(extra, module.split(".")[0], what) from exc


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a batch size, a token budget, a count), refused with
    argparse's own one-line error otherwise."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def report_errors(command: str, outcome: dict | None = None):
    """Run a command body; turn the project's errors and OS errors into one stderr line and an
    exit code stored in `outcome["code"]` (the traceback too under --debug / TTE_DEBUG=1).

        outcome = {}
        with report_errors("eval", outcome):
            ...
        return outcome.get("code", 0)
    """
    outcome = {} if outcome is None else outcome
    try:
        yield outcome
    except TTEError as exc:
        outcome["code"] = exc.exit_code
        _report(command, str(exc), exc)
    except (OSError, UnicodeDecodeError) as exc:
        outcome["code"] = BAD_INPUT
        _report(command, _os_message(exc), exc)
    except KeyboardInterrupt as exc:
        outcome["code"] = 130
        _report(command, "interrupted", exc)
    except SystemExit as exc:  # argparse has already printed `tte <command>: error: ...`
        outcome["code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else BAD_INPUT)


def command(name: str):
    """Decorate a command's `main(argv) -> int` so every error leaves it as one line and an exit
    code (see the module docstring)."""
    def decorate(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            outcome: dict = {}
            with report_errors(name, outcome):
                console.quiet_third_party()
                return int(main(argv) or 0)
            return outcome["code"]
        return run
    return decorate


def _os_message(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); check the file's encoding"
    name = getattr(exc, "filename", None)
    what = exc.strerror or str(exc)
    hints = {IsADirectoryError: "a folder was given where a file is expected",
             NotADirectoryError: "a file was given where a folder is expected",
             FileNotFoundError: "check the path (relative paths start at the current folder)",
             PermissionError: "check the permissions, or choose another path"}
    hint = next((h for t, h in hints.items() if isinstance(exc, t)), "")
    where = f"{name}: " if name else ""
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _report(command: str, message: str, exc: BaseException) -> None:
    if not _rank_zero() and getattr(exc, "every_rank", False):
        return  # the same error on every rank: rank 0 says it once
    if debug_enabled():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"tte {command}: error: {message}", file=sys.stderr, flush=True)
