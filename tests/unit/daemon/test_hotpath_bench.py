"""bench/hotpath_bench.py drives ConnectionHandler in-process with the unit tests' fake
session: a short run of it, so a change to the handler or the codec that breaks the
bench fails here rather than when someone next profiles the hot path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench" / "hotpath_bench.py"


def test_the_hot_path_bench_runs_and_reports_each_op() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--n", "200", "--rounds", "1", "--no-socket"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in ("QUERY_PATH_INFO", "IS_VALID_PATH"):
        assert f"handler {op}" in proc.stdout, proc.stdout
