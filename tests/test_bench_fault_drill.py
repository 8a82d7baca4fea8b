"""The checks of benchmarks/fault_drill.py against hand-made records and a live LocalCluster (the drill itself trains
for minutes; its result lives in benchmarks/results/fault_drill_cpu.json)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fault_drill", ROOT / "benchmarks" / "fault_drill.py")
drill = importlib.util.module_from_spec(spec); spec.loader.exec_module(drill)


def record(exact:float, seconds:float, step:int=100)->bytes:
    return json.dumps({"metrics": {"val": {"exact_match": exact}}, "best_step": step, "calibration": {}, "competence": {"passed": False},
                       "n_parameters": 10, "curves": [{"step": step, "train_seconds": seconds, "loss": 0.5}],
                       "job_seconds": seconds, "created": f"2026-12-07T17:{int(seconds) % 60:02d}:00"}).encode()


def test_compare_ignores_wall_times_and_provenance_only():
    reference = {"a.json": record(0.25, 10.0), "b.json": record(0.5, 11.0)}
    assert drill.compare(reference, {"a.json": record(0.25, 99.0), "b.json": record(0.5, 3.0)}, 0.0) == []
    problems = drill.compare(reference, {"a.json": record(0.2500001, 10.0), "c.json": record(0.5, 11.0)}, 0.0)
    assert problems == ["b.json: missing", "c.json: extra", "a.json.metrics.val.exact_match: 0.25 vs 0.2500001"]
    assert drill.compare(reference, {"a.json": record(0.2500001, 1.0), "b.json": record(0.5, 1.0)}, 1e-5) == []
    assert drill.compare(reference, {"a.json": record(0.25, 1.0, step=150), "b.json": record(0.5, 1.0)}, 1e-5) != []


def test_leftovers_and_records(tmp_path):
    (tmp_path / "records").mkdir(); (tmp_path / "checkpoints" / "B0-seed0").mkdir(parents=True)
    (tmp_path / "records" / "B0-seed1.json").write_bytes(record(0.1, 1.0))
    (tmp_path / "checkpoints" / "B0-seed0" / "last.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "B0-seed1").mkdir(); (tmp_path / "checkpoints" / "B0-seed1" / "last.pt").write_bytes(b"x")
    assert list(drill.records(tmp_path)) == ["B0-seed1.json"]
    assert drill.training_checkpoints(tmp_path) == ["B0-seed0"]                 # seed 1 has its record: not training
    assert drill.leftovers(tmp_path) == []
    (tmp_path / "records" / "B0-seed0.json.tmp").write_text("{")
    assert drill.leftovers(tmp_path) == ["records/B0-seed0.json.tmp"]


def test_dask_workers_finds_the_worker_processes_of_a_local_cluster(tmp_path):
    script = ("import time\nfrom so8lab.runner import dask_client\n"
              "if __name__ == '__main__':\n    with dask_client('local', 2) as client:\n        print('ready', flush=True); time.sleep(60)\n")
    (tmp_path / "cluster.py").write_text(script)
    process = subprocess.Popen([sys.executable, str(tmp_path / "cluster.py")], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        workers = drill.dask_workers(process.pid)
        assert len(workers) == 2 and all("spawn_main" in " ".join(w.cmdline()) for w in workers)
        assert all(w.ppid() == process.pid for w in workers)
    finally:
        os.killpg(process.pid, 9); process.wait(timeout=30)
