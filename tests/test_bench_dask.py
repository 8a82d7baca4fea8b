"""Smoke run of benchmarks/dask_workers.py (timings live in benchmarks/results, not in tests)."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dask_workers_benchmark_compares_both_clusters(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dask_workers.py"), "--steps", "2", "--workers", "1",
                             "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["dask_default"]["MALLOC_TRIM_THRESHOLD_"] == ["65536"]
    assert saved["so8lab_runner"]["MALLOC_TRIM_THRESHOLD_"] == ["None"]
    assert "| so8lab_runner | None |" in result.stdout
