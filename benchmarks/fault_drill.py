"""Fault drill for the Dask executor (issue 16, item 3): training runs through `so8lab run --executor local`, with
(a) one Dask worker process killed (SIGKILL) while it trains, and (b) the whole client killed (SIGKILL, its cluster
with it) mid-protocol and the same command run again. Both must end with every record written once and equal to an
undisturbed inline run of the same configurations: the models (metrics, validation curve, best step, calibration,
competence) agree exactly on the CPU and within `--tolerance` on CUDA; only wall times and provenance may differ.
Records that existed before a rerun must be left byte for byte, so the rerun completes only the missing ones.

    python benchmarks/fault_drill.py --preset cpu --methods proposed B0 --seeds 0 1 --device cpu --workers 2 \
        --out benchmarks/results/fault_drill_cpu.json

Writes a JSON result (device, versions, date, each phase's timings and checks) and prints a summary; exits 1 when a
check fails."""
import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ("metrics", "best_step", "calibration", "competence", "n_parameters")   # what the model is; timings and provenance are not


def so8lab_run(results:Path, executor:str, args)->list:
    "The `so8lab run` command line of one phase (through this interpreter, so no console script need be installed)."
    command = [sys.executable, "-c", "import sys; from so8lab.reports import main; sys.exit(main())", "run", "--preset", args.preset, "--methods", *args.methods,
               "--seeds", *map(str, args.seeds), "--results-dir", str(results), "--executor", executor, "--device", args.device]
    return command + (["--workers", str(args.workers)] if executor == "local" else [])


def records(results:Path)->dict:
    "Record file name -> bytes, of every record in `results`."
    folder = results / "records"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def leftovers(results:Path)->list:
    "Half-written files a crash could leave: temporary files anywhere under `results`."
    return sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.endswith("~")))


def model_part(record:dict)->dict:
    "What an interrupted run must reproduce: the compared keys, and the validation curve without its wall times."
    curves = [{k: v for k, v in point.items() if "seconds" not in k} for point in record.get("curves", [])]
    return {**{k: record.get(k) for k in COMPARED}, "curves": curves}


def differences(expected, actual, tolerance:float, where:str="")->list:
    "Paths where two JSON values differ (numbers beyond `tolerance`, relative and absolute)."
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys(): return [f"{where}: keys {sorted(expected)} vs {sorted(actual)}"]
        return [d for k in expected for d in differences(expected[k], actual[k], tolerance, f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual): return [f"{where}: {len(expected)} vs {len(actual)} items"]
        return [d for i, (a, b) in enumerate(zip(expected, actual)) for d in differences(a, b, tolerance, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        if math.isnan(expected) and math.isnan(actual): return []
        return [] if abs(expected - actual) <= tolerance * max(1.0, abs(expected)) else [f"{where}: {expected!r} vs {actual!r}"]
    return [] if expected == actual else [f"{where}: {expected!r} vs {actual!r}"]


def compare(reference:dict, drilled:dict, tolerance:float)->list:
    "Differences between the drilled records and the reference ones, per record."
    problems = [f"{name}: missing" for name in reference if name not in drilled] + [f"{name}: extra" for name in drilled if name not in reference]
    for name in reference.keys() & drilled.keys():
        problems += [f"{name}{d}" for d in differences(model_part(json.loads(reference[name])), model_part(json.loads(drilled[name])), tolerance)]
    return problems


def wait_for(condition, process, timeout:float)->bool:
    "Poll `condition` until it holds (True), the process ends or the timeout passes (False)."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition(): return True
        time.sleep(0.2)
    return False


def training_checkpoints(results:Path)->list:
    "Runs that have saved a checkpoint but no record yet: training in progress."
    done = {p.stem for p in (results / "records").glob("*.json")} if (results / "records").is_dir() else set()
    return [p.parent.name for p in (results / "checkpoints").glob("*/last.pt") if p.parent.name not in done] if (results / "checkpoints").is_dir() else []


def dask_workers(client_pid:int)->list:
    "The Dask worker processes of a client's LocalCluster: its nannies live in the client and start each worker with multiprocessing's spawn."
    def spawned(process):
        try: return "spawn_main" in " ".join(process.cmdline())
        except psutil.Error: return False
    return [p for p in psutil.Process(client_pid).children(recursive=True) if spawned(p)]


def run_phase(command:list, log:Path, environment:dict)->tuple:
    "Run one command to its end; (exit status, seconds)."
    started = time.perf_counter()
    with open(log, "a") as out: status = subprocess.run(command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT).returncode
    return status, time.perf_counter() - started


def main(argv=None)->int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu"); parser.add_argument("--methods", nargs="+", default=["proposed", "B0"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1]); parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2); parser.add_argument("--tolerance", type=float, default=None,
                                                                              help="relative tolerance (default 0 on cpu, 1e-5 on cuda)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)
    tolerance = args.tolerance if args.tolerance is not None else (0.0 if args.device == "cpu" else 1e-5)
    work = Path(args.work or tempfile.mkdtemp(prefix="so8lab-drill-")); work.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log, result = work / "drill.log", {"preset": args.preset, "methods": args.methods, "seeds": args.seeds, "device": args.device,
                                       "workers": args.workers, "tolerance": tolerance, "phases": {}}
    expected = len(args.methods) * len(args.seeds)

    # 1. the undisturbed reference, inline
    status, seconds = run_phase(so8lab_run(work / "reference", "inline", args), log, environment)
    reference = records(work / "reference")
    result["phases"]["reference"] = {"status": status, "seconds": round(seconds, 1), "records": len(reference)}
    assert status == 0 and len(reference) == expected, f"the reference run failed: see {log}"

    # 2. one worker killed while it trains
    results = work / "worker_killed"
    started = time.perf_counter()
    with open(log, "a") as out:
        client = subprocess.Popen(so8lab_run(results, "local", args), cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT)
        killed = None
        if wait_for(lambda: training_checkpoints(results) and dask_workers(client.pid), client, 600):
            victim = dask_workers(client.pid)[0]
            killed = {"pid": victim.pid, "after_seconds": round(time.perf_counter() - started, 1), "training": training_checkpoints(results)}
            victim.send_signal(signal.SIGKILL)
        status = client.wait()
    phase = {"killed_worker": killed, "status": status, "seconds": round(time.perf_counter() - started, 1)}
    before = records(results)
    if status != 0:                               # the executor gave up on the killed worker's job: the rerun completes it
        phase["rerun_status"], phase["rerun_seconds"] = run_phase(so8lab_run(results, "local", args), log, environment)
    after = records(results)
    phase |= {"records_before_rerun": len(before), "records": len(after), "rewritten": sorted(n for n in before if after.get(n) != before[n]),
              "leftovers": leftovers(results), "differences": compare(reference, after, tolerance)}
    result["phases"]["worker_killed"] = phase

    # 3. the client (and its cluster) killed mid-protocol, then the same command again
    results = work / "client_killed"
    started = time.perf_counter()
    with open(log, "a") as out:
        client = subprocess.Popen(so8lab_run(results, "local", args), cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        reached = wait_for(lambda: len(records(results)) >= 1 and training_checkpoints(results), client, 900)
        if reached: os.killpg(client.pid, signal.SIGKILL)
        client.wait()
    time.sleep(1)
    before = records(results)
    rerun_status, rerun_seconds = run_phase(so8lab_run(results, "local", args), log, environment)
    after = records(results)
    result["phases"]["client_killed"] = {
        "killed": reached, "seconds_until_kill": round(time.perf_counter() - started - rerun_seconds, 1), "records_before_rerun": len(before),
        "rerun_status": rerun_status, "rerun_seconds": round(rerun_seconds, 1), "records": len(after),
        "rewritten": sorted(n for n in before if after.get(n) != before[n]), "leftovers": leftovers(results),
        "differences": compare(reference, after, tolerance)}

    checks = {
        "worker killed mid-training": result["phases"]["worker_killed"]["killed_worker"] is not None,
        "worker drill: every record, once": result["phases"]["worker_killed"]["records"] == expected,
        "worker drill: records equal the undisturbed run": result["phases"]["worker_killed"]["differences"] == [],
        "worker drill: nothing half-written": result["phases"]["worker_killed"]["leftovers"] == [],
        "client killed with records missing": result["phases"]["client_killed"]["killed"] and result["phases"]["client_killed"]["records_before_rerun"] < expected,
        "client drill: rerun leaves existing records untouched": result["phases"]["client_killed"]["rewritten"] == [],
        "client drill: every record, once": result["phases"]["client_killed"]["records"] == expected,
        "client drill: records equal the undisturbed run": result["phases"]["client_killed"]["differences"] == [],
        "client drill: nothing half-written": result["phases"]["client_killed"]["leftovers"] == []}
    import torch
    from so8lab.provenance import code_identity
    result |= {"checks": checks, "passed": all(checks.values()), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "code": code_identity(), "torch": torch.__version__, "python": platform.python_version(),
               "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    if args.out: Path(args.out).parent.mkdir(parents=True, exist_ok=True); Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, passed in checks.items(): print(f"{'ok  ' if passed else 'FAIL'} {name}")
    print(json.dumps({k: v for k, v in result["phases"].items()}, indent=1)[:3000])
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
