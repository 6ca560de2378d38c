"""benchmarks/bench_accel.py on its small CPU shape: both cases run real jft train steps and report
tokens/s, MFU (n/a on a CPU), the peak memory and the blockwise (chunked) attention."""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SIDE_LINE = re.compile(
    r"^  jft +tokens/s (?P<tps>[\d.]+) \| s/step [\d.]+ \|.*\| loss (?P<loss>\S+) \|.*"
    r"\| MFU (?P<mfu>\S+) \(.*\| peak memory (?P<mem>[\d.]+) MiB \((?P<how>.*)\)$"
)


@pytest.fixture(scope="module")
def report() -> str:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_accel
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_accel.main(["--small", "--steps", "1", "--sides", "jft"])
    return out.getvalue()


def case_lines(report: str) -> dict:
    """case name -> that case's report lines."""
    cases, name = {}, None
    for line in report.splitlines():
        if line.startswith("case "):
            name = line.split()[1].rstrip(":")
            cases[name] = []
        elif name:
            cases[name].append(line)
    return cases


@pytest.mark.parametrize("case", ["full", "qlora"])
def test_small_case_reports_a_real_step(report, case):
    lines = case_lines(report)[case]
    assert not any("skipped" in line for line in lines), "\n".join(lines)
    sides = [m for m in map(SIDE_LINE.match, lines) if m]
    assert len(sides) == 1, "\n".join(lines)
    m = sides[0]
    assert float(m["tps"]) > 0
    # a real step on random weights: the loss of a near-uniform prediction over the 1024-token vocabulary
    assert abs(float(m["loss"]) - math.log(1024)) < 0.5
    assert m["mfu"] == "n/a" or 0 < float(m["mfu"]) < 1
    assert float(m["mem"]) > 0
    assert "memory_analysis" in m["how"]  # CPU devices have no memory counter: the compiled plan, labelled
    attention = [line for line in lines if line.startswith("  jft") and "attention:" in line]
    assert len(attention) == 1 and "chunked XLA flash attention (128-token blocks)" in attention[0]
    assert any("loss head: chunked cross-entropy" in line for line in lines)
    assert "model FLOPs per step = " in "\n".join(lines)
