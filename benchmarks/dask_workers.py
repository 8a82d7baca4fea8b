"""Training speed inside Dask worker processes, with and without the nanny's MALLOC_TRIM_THRESHOLD_ (side by side, one run).

    python benchmarks/dask_workers.py --steps 150 --json benchmarks/results/dask_workers_cpu.json

Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's trim threshold and so disables
its adaptive mmap threshold: large tensor allocations are then mapped and unmapped at every step. Two clusters of
two single-threaded workers run the same job (`--steps` training steps of the cpu-preset proposed model, one thread):
a plain `LocalCluster` with Dask's defaults, then `so8lab.runner.dask_client`'s (the variable dropped, also when
the first cluster left it in this process's environment). Each worker reports
the seconds of its steps; the table gives both settings' per-worker seconds and the ratio.
"""
import argparse, datetime, json, logging, os, platform, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def train(steps:int)->float:
    "Seconds for `steps` training steps of the cpu-preset proposed model (data drawn once, before timing)."
    import torch
    torch.set_num_threads(1)
    from so8lab.experiments import get_preset, run_configs
    from so8lab.models import GridModel
    from so8lab.tasks import PoolSampler, sample_tasks
    from so8lab.training import Trainer
    preset = get_preset("cpu")
    model_config, train_config = run_configs("proposed", preset)
    torch.manual_seed(0)
    sampler = PoolSampler(sample_tasks(4000, "train", seed=0), seed=0, groups=preset.groups, group_size=preset.group_size)
    trainer = Trainer(GridModel(model_config), train_config, sampler, sample_tasks(200, "val"))
    started = time.perf_counter()
    for step in range(steps): trainer._train_step(step)
    return time.perf_counter() - started


def measure(client, steps:int, workers:int)->dict:
    "Per-worker seconds of `train(steps)` on the cluster of `client`, and the workers' MALLOC_TRIM_THRESHOLD_."
    trim = sorted({str(v) for v in client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()})
    seconds = client.gather(client.map(train, [steps] * workers, pure=False))
    return {"MALLOC_TRIM_THRESHOLD_": trim, "seconds_per_worker": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the result here")
    arguments = parser.parse_args()
    import dask, distributed, torch
    from distributed import Client, LocalCluster
    from so8lab.provenance import code_identity, cpu_name
    from so8lab.runner import dask_client
    result = {}
    with LocalCluster(n_workers=arguments.workers, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:      # Dask's defaults
        result["dask_default"] = measure(client, arguments.steps, arguments.workers)
    with dask_client("local", arguments.workers) as client:                                  # what so8lab's runner starts
        result["so8lab_runner"] = measure(client, arguments.steps, arguments.workers)
    mean = {k: sum(v["seconds_per_worker"]) / len(v["seconds_per_worker"]) for k, v in result.items()}
    result.update(steps=arguments.steps, workers=arguments.workers, slowdown_of_dask_default=mean["dask_default"] / mean["so8lab_runner"],
                  device_name=cpu_name(), cpu_count=os.cpu_count(), torch=torch.__version__, dask=dask.__version__,
                  distributed=distributed.__version__, python=platform.python_version(), code=code_identity(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if arguments.json: Path(arguments.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"| cluster | MALLOC_TRIM_THRESHOLD_ | s per worker ({arguments.steps} steps) |\n|---|---|---|")
    for name in ("dask_default", "so8lab_runner"):
        print(f"| {name} | {', '.join(result[name]['MALLOC_TRIM_THRESHOLD_'])} | {mean[name]:.2f} |")
    print(f"\nDask's default is {result['slowdown_of_dask_default']:.2f}x slower ({result['device_name']}, {result['date']})")


if __name__ == "__main__": main()
