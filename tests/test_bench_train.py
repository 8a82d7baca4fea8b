"""Smoke test of the training-throughput benchmark: it runs and prints the documented JSON (no timing assertions)."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_throughput_prints_json():
    result = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--threads", "1", "--batch-size", "16",
                             "--steps", "2", "--warmup", "1", "--json"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout)
    assert payload["samples_per_s"] > 0 and payload["n_params"] == 968_470
    assert (payload["batch_size"], payload["steps"], payload["threads"]) == (16, 2, 1)
