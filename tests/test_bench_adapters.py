"Smoke test of benchmarks/adapter_steps.py: a short CPU run writes one well-formed row per method (no timing assertions)."
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_run_writes_a_row_per_method(tmp_path):
    path = tmp_path / "steps.json"
    methods = ["lora-r1", "so8", "so8-ungated", "oft", "full"]
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapter_steps.py"), "--preset", "smoke", "--methods", *methods,
                                "--shots", "5", "--warmup", "1", "--repeats", "2", "--json", str(path)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(path.read_text())
    assert {"device", "torch", "peft", "date_utc", "rows"} <= set(result)
    assert [row["method"] for row in result["rows"]] == methods
    assert all(row["ms_per_step"] > 0 and row["parameters"] > 0 for row in result["rows"])
    by_method = {row["method"]: row for row in result["rows"]}
    assert by_method["lora-r1"]["orthogonality_error"] is None and by_method["full"]["orthogonality_error"] is None
    assert by_method["so8"]["orthogonality_error"] < 1e-5                    # the exponential map: orthogonal to float32 rounding
    assert by_method["lora-r1"]["parameters"] < by_method["so8"]["parameters"] < by_method["full"]["parameters"]
