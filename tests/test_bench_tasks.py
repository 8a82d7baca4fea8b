"Smoke test of benchmarks/bench_tasks.py: the --quick run finishes and writes well-formed results (no timing assertions)."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_results(tmp_path):
    json_path, markdown_path = tmp_path / "tasks.json", tmp_path / "tasks.md"
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tasks.py"), "--quick", "--device", "cpu",
                                "--json", str(json_path), "--markdown", str(markdown_path)],
                               cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(json_path.read_text())
    for key in ("device", "cpu_model", "gpu_name", "torch_version", "numpy_version", "python_version", "date_utc",
                "thread_counts", "reference", "rows", "summary", "agreement"):
        assert key in result, key
    assert result["device"] == "cpu" and result["quick"] is True and 1 in result["thread_counts"]
    assert {row["split"] for row in result["rows"]} == {"train", "heldout"}
    assert {row["threads"] for row in result["rows"]} == set(result["thread_counts"])
    assert all(row["samples_per_s"] > 0 and row["batch_size"] > 0 for row in result["rows"])
    assert all(result["reference"][split]["samples_per_s"] > 0 for split in ("train", "heldout"))
    assert result["agreement"]["train"]["agree"] and result["agreement"]["heldout"]["agree"]
    table = markdown_path.read_text()
    assert "| run | split |" in table and table.count("\n| cpu run |") == len(result["rows"])
    assert completed.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])   # the report is printed last


def test_combine_renders_one_table(tmp_path):
    "--combine merges result files into one report without running anything."
    rows = [{"split": "train", "device": "cpu", "threads": 1, "batch_size": 4096, "samples_per_s": 200_000.0}]
    summary = {"cpu_one_thread_train_samples_per_s": 200_000.0, "meets_one_thread_target": True,
               "speedup_one_thread_vs_reference": 20.0, "meets_speedup_target_vs_this_reference": False,
               "speedup_one_thread_vs_spec_reference_840": 238.1}
    result = {"device": "cpu", "date_utc": "2026-01-01T00:00:00Z", "cpu_model": "X", "cpu_cores": 2, "gpu_name": None,
              "cuda_version": None, "torch_version": "t", "numpy_version": "n", "python_version": "p", "quick": False,
              "load_average_1min": {"before": 0.5, "after": 0.5}, "rows": rows, "summary": summary,
              "reference": {"train": {"samples_per_s": 10_000.0}}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths: path.write_text(json.dumps(result))
    out = tmp_path / "all.md"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tasks.py"), "--combine", *map(str, paths),
                                "--markdown", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = out.read_text()
    assert text.count("| cpu run | train | cpu | 1 | 4,096 | 200,000 | 10,000 | 20.0× |") == 2   # 200,000 / 10,000 by hand
    assert "**not met**" in text
