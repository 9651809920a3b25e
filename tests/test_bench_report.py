"""bench/report.py regenerates RESULTS.md's tables and analysis and keeps the sections measured by hand."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rewrite_keeps_the_sections_measured_by_hand():
    report = load_report()
    previous = "\n".join(["# Benchmark results", "| old table |", "## Analysis", "old notes", report.HAND_MEASURED, "",
                          "## 2026-12-07: a session", "| start | end |"])
    kept = report.hand_measured_sections(previous)
    assert kept == [report.HAND_MEASURED, "", "## 2026-12-07: a session", "| start | end |"]
    assert report.hand_measured_sections("# Benchmark results\n## Analysis\nnotes\n") == []


def test_the_committed_results_mark_their_sessions_for_the_rewrite_to_keep():
    """Every dated session section of bench/RESULTS.md stands after the marker, so `python bench/report.py` keeps
    it (without the marker a rewrite dropped them all)."""
    report = load_report()
    text = (BENCH / "RESULTS.md").read_text()
    kept = "\n".join(report.hand_measured_sections(text))
    dated = [line for line in text.splitlines() if line.startswith("## 2026-")]
    assert dated and all(line in kept.splitlines() for line in dated)
