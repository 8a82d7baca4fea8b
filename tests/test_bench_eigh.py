"Smoke test of benchmarks/eigh_backends.py: a short run writes well-formed results whose eigenvalues match float64 (no timing assertions)."
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_run_writes_results_that_agree_with_float64(tmp_path):
    path = tmp_path / "eigh.json"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eigh_backends.py"), "--batches", "2", "--size", "32",
                                "--repeats", "2", "--json", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(path.read_text())
    assert {"device", "torch", "date_utc", "rows"} <= set(result)
    assert all(row["ms"] > 0 and row["batch"] == 2 and row["size"] == 32 for row in result["rows"])
    assert all(row["max_eigenvalue_error"] < 1e-4 for row in result["rows"])         # float32 eigenvalues of O(1) matrices
    assert completed.stdout.rstrip().splitlines()[-1].startswith("| host")
