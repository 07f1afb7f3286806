"""docs/results pages are rendered from runs (tools/report.py), and README.md's headline tables
are those pages' headline tables: the two cannot drift apart."""
import json
import re
from pathlib import Path

import pytest

from unified_tte.errors import DataError
from unified_tte.tools.report import (HEADLINE_END, HEADLINE_START, command_line, git_state, headline, provenance, render,
                                      report_main)

ROOT = Path(__file__).resolve().parents[1]
README_HEADLINE = re.compile(r"<!-- headline: (\S+) -->\n(.*?)\n<!-- /headline -->", re.S)


def test_every_readme_headline_table_equals_its_results_page():
    readme = (ROOT / "README.md").read_text()
    blocks = README_HEADLINE.findall(readme)
    assert len(blocks) >= 2, "README.md should show one headline table per demo"
    for page, table in blocks:
        path = ROOT / page
        assert path.is_file(), f"README.md links a results page that does not exist: {page}"
        assert table.strip() == headline(path.read_text(), page), f"README.md's headline differs from {page}"


def test_every_results_page_says_its_command_machine_commit_and_date():
    pages = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert pages
    for page in pages:
        if page.name == "README.md":
            continue
        text = page.read_text()
        for field in ("- command: ", "- machine: ", "- commit: ", "- date: "):
            assert field in text, f"{page.name} lacks {field.strip()}"


def fake_demo(folder: Path, table: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "backbone": "tiny", "quick": False, "elapsed_s": 360.0, "headline_md": table,
        "tables_md": table + "\n\nClaims\n\n| claim | figures | holds |", "bench_md": "| mode |",
        "provenance": {"command": "tte demo", "machine": "a CPU", "threads": 1, "commit": "abc1234",
                       "dirty": False, "date": "2026-12-07 12:00 UTC", "python": "3.11", "torch": "2.13",
                       "transformers": "5.25"}}))
    return folder


def test_a_demo_page_renders_from_summary_json_with_its_provenance_and_headline(tmp_path):
    table = "| system | all avg |\n|---|---:|\n| unified TTE (activated) | 81.3 |"
    page = render(fake_demo(tmp_path / "run", table))
    assert page.startswith("# tte demo --backbone tiny\n")
    assert "- commit: abc1234\n" in page and "- date: 2026-12-07 12:00 UTC" in page and "6.0 min" in page
    assert headline(page) == table and page.count(HEADLINE_START) == page.count(HEADLINE_END) == 1
    assert report_main([str(tmp_path / "run"), "--out", str(tmp_path / "page.md")]) == 0
    assert (tmp_path / "page.md").read_text() == page


def test_a_folder_that_is_no_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="neither summary.json"):
        render(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    assert report_main([str(tmp_path)]) == 2
    assert "written by an older `tte demo`" in capsys.readouterr().err


def test_the_command_recorded_leaves_out_the_output_folders():
    assert command_line("tte demo", ["--backbone", "smollm2", "--out", "x", "--checkpoint=y", "--fresh"]) == \
        "tte demo --backbone smollm2 --fresh"


def test_a_checkout_that_changed_during_the_run_names_both_commits(tmp_path):
    folder = fake_demo(tmp_path / "run", "| system |\n|---|\n| x |")
    summary = json.loads((folder / "summary.json").read_text())
    summary["provenance"].update(started_at_commit="0000001", started_dirty=False)
    (folder / "summary.json").write_text(json.dumps(summary))
    assert "- commit: 0000001 at the start, abc1234 at the end (the checkout changed during the run)\n" in render(folder)
    same = provenance("tte demo", "a CPU", 1, started=git_state())   # nothing changed: one commit
    assert "started_at_commit" not in same and same["commit"] == git_state()[0]


def test_a_demo_page_links_its_frontier_plot_copied_beside_it(tmp_path):
    folder = fake_demo(tmp_path / "run", "| system |\n|---|\n| x |")
    summary = json.loads((folder / "summary.json").read_text())
    summary["tables_md"] += f"\n\nthink rates (frontier: {folder / 'frontier.png'})"
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "frontier.png").write_bytes(b"\x89PNG plot")
    assert report_main([str(folder), "--out", str(tmp_path / "docs" / "demo-x.md")]) == 0
    assert (tmp_path / "docs" / "demo-x-frontier.png").read_bytes() == b"\x89PNG plot"
    page = (tmp_path / "docs" / "demo-x.md").read_text()
    assert "(frontier: [demo-x-frontier.png](demo-x-frontier.png))" in page and str(folder) not in page
