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


def test_train_throughput_profile_reports_a_breakdown():
    result = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--threads", "1", "--batch-size", "16",
                             "--steps", "2", "--warmup", "1", "--profile", "--json"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    profile = json.loads(result.stdout[result.stdout.index("{"):])["profile"]
    assert profile["steps"] == 2 and profile["wall_ms_per_step_profiled"] > 0
    assert (profile["kernel_launches_per_step"], profile["host_syncs_per_step"], profile["gpu_kernel_ms_per_step"]) == (0, 0, 0)  # CPU run
    assert any("AdamW" in name for name in profile["top_cpu_ops_ms_per_step"])   # the optimizer step is inside the profiled step
