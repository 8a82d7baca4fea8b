"Smoke test of benchmarks/dual_encoder_steps.py on the CPU (a few steps; no timing assertions)."
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_prints_both_objectives_and_a_profile(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dual_encoder_steps.py"), "--smoke"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert "plan dual encoder d_model 128, batch 1024 in 16 groups, share k 16" in lines[0]
    for share in ("0.0", "0.1"):
        assert any(re.match(rf"share {share}: first 2 steps [\d.]+ s; steady state -?[\d.]+ ms/step", line) for line in lines), completed.stdout
    assert "Self CPU" in completed.stdout and "aten::" in completed.stdout       # the profiler's table follows
