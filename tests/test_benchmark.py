"""The benchmark harness runs end to end on the tiny configuration (ours and transformers side by side)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_runs_on_tiny_config(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--config", "tiny", "--frameworks", "ours,hf", "--precisions", "fp32",
         "--repeats", "1", "--threads", "1", "--cases", "b,f_itm", "--work-dir", str(tmp_path / "work"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == {"b", "f_itm"}
    assert rows["b"]["ours"]["median_s"] > 0 and rows["b"]["hf"]["median_s"] > 0
    assert rows["b"]["ours"]["gflop"] > 0 and rows["b"]["ratio_ours_over_hf"] > 0
    assert "ours" not in rows["f_itm"] and rows["f_itm"]["hf"]["median_s"] > 0
    assert result["matmul_peak_gflops"]["fp32"] > 0
