"""The runner and the house: executors give the same records as sequential runs, a killed worker costs only its run,
checkpoints belong to their record, a run's numbers do not depend on the machine's thread count, and the import
graph of so8lab/ has no cycle, keeps notebook order, and never imports the papermill runner."""
import ast, os, re, shutil, signal, threading, time, warnings
from pathlib import Path

import dask
import pytest
import torch
from distributed import Client, LocalCluster

from so8lab.experiments import checkpoint_directory, load_model, record_path, run, run_many, training_job
from so8lab.provenance import read_json
from so8lab.runner import JobsFailed, run_jobs
from so8lab.training import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("created", "job_seconds", "timings", "curves")   # wall-clock fields (curves hold train_seconds)


def comparable(record):
    "A record without its wall-clock fields, with the curves' metrics kept."
    kept = {k: v for k, v in record.items() if k not in TIMING}
    kept["curves"] = [{k: v for k, v in point.items() if k != "train_seconds"} for point in record["curves"]]
    return kept


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    "Smoke-preset B0 runs of seeds 0-2, trained in this process one after another."
    directory = tmp_path_factory.mktemp("sequential")
    return run_many(["B0"], [0, 1, 2], "smoke", directory, "cpu", executor="inline")


def test_local_cluster_sweep_equals_sequential_runs(sequential, tmp_path):
    clustered = run_many(["B0"], [0, 1, 2], "smoke", tmp_path, "cpu", workers=2, executor="local")
    assert [comparable(r) for r in clustered] == [comparable(r) for r in sequential]
    assert {r["cpu_threads"] for r in clustered} == {1}


def test_a_run_does_not_depend_on_the_callers_thread_count(sequential, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)                     # a notebook or a busy machine with more threads
    try: record = run("B0", 0, "smoke", tmp_path, "cpu")
    finally: torch.set_num_threads(before)
    assert record["cpu_threads"] == 1            # the preset's fixed count, recorded
    assert comparable(record) == comparable(sequential[0])


def test_new_records_carry_a_code_identity(sequential):
    identity = sequential[0]["git_sha"]
    assert identity != "unknown" and (re.fullmatch(r"[0-9a-f]{40}(-dirty\+sources-[0-9a-f]{16})?", identity)
                                      or re.fullmatch(r"sources-[0-9a-f]{16}", identity))


def test_two_processes_asking_for_one_run_train_it_once(tmp_path):
    job = training_job("B0", 4, "smoke", tmp_path)
    first, second = run_jobs([job, job], "local", workers=2, device="cpu")
    assert first == second                       # the second waited on the lock and read the first's record


def _kill_worker_running(client, name, started):
    "SIGKILL the worker process that is computing the job called `name`, once its training has checkpointed."
    deadline = time.time() + 120
    while time.time() < deadline:
        processing = client.processing()
        pids = client.run(os.getpid)
        for worker, keys in processing.items():
            if any(str(key).startswith(f"{name}-") for key in keys) and started():
                os.kill(pids[worker], signal.SIGKILL)
                return True
        time.sleep(0.05)
    return False


def test_a_killed_worker_costs_only_its_run(sequential, tmp_path):
    jobs = [training_job("B0", seed, "smoke", tmp_path) for seed in (0, 1, 2)]
    victim = jobs[1]
    last = checkpoint_directory(tmp_path, "B0", 1) / "last.pt"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
         LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
         Client(cluster) as client:
        outcome = {}
        def sweep():
            try: outcome["records"] = run_jobs(jobs, cluster.scheduler_address, device="cpu")
            except JobsFailed as error: outcome["error"] = error
        thread = threading.Thread(target=sweep); thread.start()
        assert _kill_worker_running(client, victim.name, last.exists)
        thread.join(300)
    assert "B0-seed1" in str(outcome["error"]) and "1 of 3" in str(outcome["error"])
    assert not Path(victim.path).exists()
    kept = {seed: record_path(tmp_path, "B0", seed).stat().st_mtime_ns for seed in (0, 2)}
    rerun = run_jobs(jobs, "inline", device="cpu")                    # completes only the missing record
    assert {seed: record_path(tmp_path, "B0", seed).stat().st_mtime_ns for seed in (0, 2)} == kept
    assert [comparable(r) for r in rerun] == [comparable(r) for r in sequential]


def test_a_half_trained_checkpoint_is_never_used_for_the_record(sequential, tmp_path):
    record = run("B0", 0, "smoke", tmp_path, "cpu")
    best = checkpoint_directory(tmp_path, "B0", 0) / "best.pt"
    early = load_checkpoint(best)
    early["step"] = 20 if record["best_step"] != 20 else 10          # what a retrain killed half-way leaves
    torch.save(early, best)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model("B0", 0, "smoke", tmp_path, "cpu")
    assert any("but the record's best step is" in str(w.message) for w in caught)
    assert load_checkpoint(best)["step"] == record["best_step"]
    reference = load_checkpoint(best)["model"]
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in record_path(tmp_path, "B0", 0).parent.iterdir()) == [".locks", "B0-seed0.json"]
    assert read_json(record_path(tmp_path, "B0", 0)) == record


def test_a_damaged_last_checkpoint_does_not_block_the_run(sequential, tmp_path):
    directory = checkpoint_directory(tmp_path, "B0", 0)
    directory.mkdir(parents=True)
    (directory / "last.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="last.pt is not a readable checkpoint"):
        record = run("B0", 0, "smoke", tmp_path, "cpu")
    assert comparable(record) == comparable(sequential[0])


# ---------------------------------------------------------------- the house

def _imports(path:Path)->set:
    "so8lab modules imported anywhere in `path` (top level or inside functions)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("so8lab."): found.add(node.module.split(".")[1])
            elif node.module == "so8lab": found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("so8lab."))
    return found


def _graph()->dict:
    modules = {p.stem: p for p in (ROOT / "so8lab").glob("*.py") if not p.stem.startswith("_")}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    graph, state = _graph(), {}
    def visit(node, path):
        if state.get(node) == "done": return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for other in graph[node]: visit(other, path + [node])
        state[node] = "done"
    for node in graph: visit(node, [])


def test_nothing_imports_the_papermill_runner():
    assert [name for name, imported in _graph().items() if "reports" in imported] == []


def test_a_notebook_imports_only_lower_numbers():
    number = {}
    for path in (ROOT / "so8lab").glob("*.py"):
        source = re.search(r"File to edit: \.\./nbs/(\d+)([a-z]?)_", path.read_text())   # 14b sits between 14 and 15
        if source: number[path.stem] = (int(source.group(1)), source.group(2))
    for name, imported in _graph().items():
        for other in imported:
            assert number[other] < number[name], f"{name} ({number[name]}) imports {other} ({number[other]})"


def test_committed_records_and_kept_models_render_without_training(tmp_path):
    "What a fresh clone has of a plan-like run (records/ and models/, no checkpoints) loads its model and trains nothing."
    from dataclasses import replace
    from so8lab.experiments import load_trained, model_path
    job = replace(training_job("B0", 0, "smoke", tmp_path / "made"), options={"keep_model": True})
    record = run_jobs([job], device="cpu")[0]
    clone = tmp_path / "clone"
    for part in ("records", "models"): shutil.copytree(tmp_path / "made" / part, clone / part)
    moved = replace(training_job("B0", 0, "smoke", clone), options={"keep_model": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # a retrain announces itself with a warning
        model = load_trained(moved, "cpu")
    assert not (clone / "checkpoints").exists()
    reference = load_checkpoint(model_path(clone, "B0", 0))
    assert reference["step"] == record["best_step"] and reference["identity"] == record["config_hash"]
    assert all(torch.equal(reference["model"][k], v) for k, v in model.state_dict().items())


def test_plan_kept_models_are_not_git_ignored():
    import subprocess
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "reports/plan/runs/plan/models/proposed-seed0.pt"])
    assert ignored.returncode == 1                  # 1: not ignored, so a plan run's kept models are committed with its records


def test_local_cluster_workers_keep_the_adaptive_malloc_threshold(monkeypatch):
    "Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536, also in the starting process; local clusters drop it, inherited too."
    from so8lab.runner import dask_client
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")       # what an earlier default Dask cluster leaves behind
    with dask_client("local", 1) as client:
        assert set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {None}
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"       # this process's environment is put back
