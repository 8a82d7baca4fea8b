"Smoke test of benchmarks/bench_infonce.py on the CPU: tiny shapes, the fused path in Triton's interpreter; checks the results' structure and that fused and reference agree (no timing assertions)."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_smoke_run_writes_results_where_fused_and_reference_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_infonce.py"), "--cpu-smoke", "--out", str(tmp_path)],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "bench_infonce.json").read_text())
    assert {"device", "torch", "triton", "date", "mode", "rows", "matmul", "checks", "targets", "skipped", "errors"} <= set(result)
    assert result["mode"] == "cpu-smoke" and result["errors"] == [] and result["skipped"] == []
    configurations = {(N, D, dtype) for N in (16, 80) for D in (8, 300) for dtype in ("bfloat16", "float32", "float32-tf32")}
    assert {(r["N"], r["D"], r["dtype"], r["peer"]) for r in result["rows"]} == {(*c, p) for c in configurations for p in ("fused", "reference", "torch.compile")}
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["essential_flops"] == 6 * r["N"] ** 2 * r["D"] for r in result["rows"])
    assert {(m["N"], m["D"], m["dtype"]) for m in result["matmul"]} == configurations
    assert {(c["N"], c["D"], c["dtype"]) for c in result["checks"]} == configurations
    for check in result["checks"]:
        loose = check["dtype"] == "bfloat16"   # da, db carry one bfloat16 rounding (truncated by the interpreter)
        for against in ("fused_vs_reference", "fused_vs_float64"):
            errors = check[against]
            assert errors["loss"] < 1e-5 and errors["dscale"] < 1e-4, (check, against)
            assert max(errors["da"], errors["db"]) < (8e-3 if loose else 1e-5), (check, against)
        assert check["passed"] is True
    assert result["checks_passed"] is True and result["targets"]["headline_N"] == 80
    assert set(result["targets"]["speedup"]) == {f"{dt} D={D} vs {p}" for dt in ("bfloat16", "float32", "float32-tf32") for D in (8, 300) for p in ("reference", "torch.compile")}
    assert (tmp_path / "bench_infonce.md").read_text().startswith("# Fused InfoNCE")
    assert "## Targets at N = 80" in completed.stdout
