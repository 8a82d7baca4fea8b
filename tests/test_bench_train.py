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
    assert payload["samples_per_s"] > 0 and payload["n_params"] == 967_702
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


def _run(*arguments):
    result = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--threads", "1", *arguments, "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_a_batched_group_counts_the_samples_of_every_run():
    payload = _run("--batch-size", "16", "--steps", "2", "--warmup", "1", "--runs", "2")
    assert payload["runs"] == 2 and abs(payload["samples_per_s"] - 2 * payload["samples_per_s_per_run"]) < 1e-6 * payload["samples_per_s"]


def test_competence_stops_at_the_first_validation_that_reaches_the_target():
    payload = _run("--competence", "--batch-size", "16", "--max-steps", "20", "--eval-every", "5", "--val-size", "20", "--target", "0.0")
    assert payload["reached"] and payload["step"] == 5 and payload["time_to_competence_s"] == payload["wall_s"]
    unreachable = _run("--competence", "--batch-size", "16", "--max-steps", "10", "--eval-every", "5", "--val-size", "20", "--target", "1.01")
    assert not unreachable["reached"] and unreachable["time_to_competence_s"] is None and unreachable["step"] == 10
