"""Results pages rendered from a run's own output files: figures come from runs, not hands.

    python -m unified_tte.tools.report runs/demo --out docs/results/demo-digits.md
    python -m unified_tte.tools.report runs/demo-smollm2 --out docs/results/demo-smollm2.md
    python -m unified_tte.tools.report bench_out --out docs/results/bench-smollm2.md   # a `tte bench --out` folder

A demo folder is read from its summary.json (`tte demo` writes it), a bench folder from its
results.jsonl, table.md and provenance.json. Every page opens with the command, the machine, the
commit and the date that produced it, then the tables as the run printed them. A demo page's
headline table sits between `<!-- headline -->` and `<!-- /headline -->`; README.md repeats it
between the same markers, and tests/test_results_docs.py fails when the two differ. With `--out`,
a demo's frontier plot (frontier.png) is copied beside the page as NAME-frontier.png and the page
links that copy instead of the run folder.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DataError, command

HEADLINE_START, HEADLINE_END = "<!-- headline -->", "<!-- /headline -->"


def command_line(program: str, argv, drop: tuple[str, ...] = ("--out", "--checkpoint")) -> str:
    """The command as a user reruns it: `program` and its arguments without the output folders."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not a.startswith(tuple(f"{d}=" for d in drop)):
            kept.append(a)
    return " ".join([program, *kept])


def git_state() -> tuple[str, bool | None]:
    """(short commit, uncommitted changes?) of the checkout the package runs from."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout", None


def provenance(command_line: str, machine: str, threads: int | None = None,
               started: tuple[str, bool | None] | None = None) -> dict:
    """Where a measurement came from: the command, the machine, the commit (with a flag for
    uncommitted changes in the checkout the package runs from), the date and the versions.
    `started`: git_state() when a long run began; recorded when the checkout changed meanwhile
    (a page then names both commits)."""
    import torch
    import transformers

    commit, dirty = git_state()
    p = {"command": command_line, "machine": machine, "threads": threads, "commit": commit, "dirty": dirty,
         "date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version(),
         "torch": torch.__version__, "transformers": transformers.__version__}
    if started is not None and tuple(started) != (commit, dirty):
        p["started_at_commit"], p["started_dirty"] = started
    return p


def _header(title: str, p: dict, extra: str = "") -> str:
    commit = p.get("commit", "not recorded") + (" (with uncommitted changes)" if p.get("dirty") else "")
    if p.get("started_at_commit"):
        commit = (f"{p['started_at_commit']}" + (" (with uncommitted changes)" if p.get("started_dirty") else "")
                  + f" at the start, {commit} at the end (the checkout changed during the run)")
    return (f"# {title}\n\n"
            f"- command: `{p.get('command', 'not recorded')}`\n"
            f"- machine: {p.get('machine', 'not recorded')}"
            + (f", {p['threads']} torch threads" if p.get("threads") else "") + "\n"
            f"- commit: {commit}\n- date: {p.get('date', 'not recorded')}\n"
            f"- versions: python {p.get('python', '?')}, torch {p.get('torch', '?')}, "
            f"transformers {p.get('transformers', '?')}\n" + extra + "\n"
            "Rendered by `python -m unified_tte.tools.report` from the run's own output files; do not edit by hand.\n\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: pass the folder a `tte demo` or `tte bench` run wrote") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); rerun the command") from None


def render_demo(folder: Path, frontier: str | None = None) -> str:
    """The demo's page; `frontier` (a file name beside the page) replaces the run's frontier path."""
    s = _read_json(folder / "summary.json")
    for key in ("tables_md", "headline_md", "provenance"):
        if key not in s:
            raise DataError(f"{folder / 'summary.json'} has no {key!r}: it was written by an older `tte demo`; "
                            "rerun the demo to render its page")
    minutes = f"- run time: {s['elapsed_s'] / 60:.1f} min{' (--quick: numbers not meaningful)' if s.get('quick') else ''}\n"
    page = _header(f"tte demo --backbone {s['backbone']}", s["provenance"], minutes)
    page += f"{HEADLINE_START}\n{s['headline_md'].strip()}\n{HEADLINE_END}\n\n{s['tables_md'].strip()}\n"
    if s.get("bench_md"):
        page += f"\n## Bench (same run)\n\n{s['bench_md'].strip()}\n"
    if frontier is not None:
        page = re.sub(r"frontier: \S*frontier\.png", f"frontier: [{frontier}]({frontier})", page)
    return page


def render_bench(folder: Path) -> str:
    if not (folder / "table.md").is_file():
        raise DataError(f"{folder / 'table.md'} is missing: pass a `tte bench --out` folder")
    p = _read_json(folder / "provenance.json")
    return _header("tte bench", p) + (folder / "table.md").read_text().strip() + "\n"


def render(folder: str | Path, frontier: str | None = None) -> str:
    folder = Path(folder)
    if (folder / "summary.json").is_file():
        return render_demo(folder, frontier)
    if (folder / "results.jsonl").is_file():
        return render_bench(folder)
    raise DataError(f"{folder} holds neither summary.json (a `tte demo --out` folder) nor results.jsonl "
                    "(a `tte bench --out` folder)")


def headline(text: str, where: str = "the page") -> str:
    """The table between the headline markers of a page (or of the README)."""
    if HEADLINE_START not in text or HEADLINE_END not in text:
        raise DataError(f"{where} has no {HEADLINE_START} ... {HEADLINE_END} block")
    return text.split(HEADLINE_START, 1)[1].split(HEADLINE_END, 1)[0].strip()


@command("report")
def report_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unified_tte.tools.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a `tte demo --out` or `tte bench --out` folder")
    p.add_argument("--out", default=None, help="the page to write (default: print it)")
    args = p.parse_args(argv)
    if args.out is None:
        print(render(args.run), end="")
        return 0
    out, plot = Path(args.out), Path(args.run) / "frontier.png"
    demo_plot = (Path(args.run) / "summary.json").is_file() and plot.is_file()
    copy = out.with_name(f"{out.stem}-frontier.png") if demo_plot else None
    page = render(args.run, frontier=copy.name if copy else None)   # raises before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(plot, copy)
        print(f"wrote {copy}")
    out.write_text(page)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(report_main())
