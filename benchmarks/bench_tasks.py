"""Benchmark: samples/s of `so8lab.tasks.sample_tasks` against a per-sample numpy reference generator (SPEC §10).

    PYTHONPATH=. python benchmarks/bench_tasks.py --device cpu  --json benchmarks/results/tasks_cpu.json
    PYTHONPATH=. python benchmarks/bench_tasks.py --device cuda --json $OUT/tasks_gpu.json --markdown $OUT/tasks_gpu.md
    python benchmarks/bench_tasks.py --combine benchmarks/results/tasks_cpu.json benchmarks/results/tasks_gpu.json --markdown benchmarks/results/tasks.md

Both peers run in the same process: `sample_tasks` for the `train` and `heldout` splits at several batch sizes (on CPU
with torch threads = 1 and = all cores; on CUDA timed between `torch.cuda.synchronize()` calls), and the reference
(`reference_generator.py`, one grid at a time, one thread). Each rate is n / median time of several repeats after a
warm-up; every repeat draws fresh samples (another seed). Before timing, each peer's outputs are checked with the
other's primitives, so both compute the same function. The markdown table is printed last.
"""
import argparse, datetime, json, os, platform, statistics, sys, time
from pathlib import Path

import numpy as np
import torch

ALL_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
torch.set_num_threads(ALL_CORES)                 # threads are fixed before any work (and set again per measurement)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import reference_generator as reference          # noqa: E402
from so8lab.primitives import apply_encoded      # noqa: E402
from so8lab.tasks import sample_tasks            # noqa: E402

SPLITS = ("train", "heldout")
TARGET_SPEEDUP, TARGET_ONE_THREAD_TRAIN = 100, 84_000   # SPEC §10
SPEC_REFERENCE_RATE = "600-840"                         # samples/s SPEC §10 measured for the original reference


def cpu_model() -> str:
    "CPU model name from /proc/cpuinfo (platform string elsewhere)."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def synchronize(device: str):
    if device == "cuda": torch.cuda.synchronize()


def time_median(function, repeats: int, device: str = "cpu") -> tuple[float, list[float]]:
    "Median wall time of `function(repeat)` over `repeats` calls, after one warm-up call."
    function(-1)
    times = []
    for repeat in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function(repeat)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def load_average() -> float | None:
    "1-minute load average of the host (other processes compete for the cores when it exceeds their number)."
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cuda_equals_cpu(n: int) -> bool:
    "The CUDA batch holds the same values as the CPU batch (the generator is device-independent)."
    same = all(sample_tasks(n, split, seed=5, device="cuda").equal(sample_tasks(n, split, seed=5)) for split in SPLITS)
    if not same: raise AssertionError("sample_tasks differs between CUDA and CPU")
    return same


def check_agreement(n: int) -> dict:
    "Each generator's outputs equal its programs applied by the other's primitives (same semantics, same work)."
    result = {"samples_per_split": n}
    for split in SPLITS:
        inputs, outputs, primitive, parameters, _ = reference.reference_sample_tasks(n, split, seed=123)
        ours = apply_encoded(torch.from_numpy(inputs), torch.from_numpy(primitive), torch.from_numpy(parameters))
        batch = sample_tasks(n, split, seed=123)
        theirs = np.stack([reference.apply_program(g, p, q) for g, p, q in
                           zip(batch.inputs.numpy(), batch.primitive.numpy(), batch.parameters.numpy())])
        agree = bool(torch.equal(ours, torch.from_numpy(outputs))) and bool((theirs == batch.outputs.numpy()).all())
        if not agree: raise AssertionError(f"{split}: reference and so8lab disagree on primitive semantics")
        result[split] = {"agree": agree,
                         "background_fraction": {"so8lab": float((batch.inputs == 0).float().mean()),
                                                 "reference": float((inputs == 0).mean())},
                         "mean_program_length": {"so8lab": float((batch.primitive >= 0).sum(1).float().mean()),
                                                 "reference": float((primitive >= 0).sum(1).mean())}}
    return result


def bench_reference(n: int, repeats: int) -> dict:
    "Reference samples/s on one thread, per split."
    torch.set_num_threads(1)
    rates = {}
    for split in SPLITS:
        reference.reference_sample_tasks(max(n // 10, 10), split, seed=999)       # warm-up
        median, times = time_median(lambda r: reference.reference_sample_tasks(n, split, seed=1000 + r), repeats)
        rates[split] = {"samples_per_s": n / median, "n": n, "repeats": repeats, "threads": 1,
                        "seconds": times}
    return rates


def bench_ours(device: str, batch_sizes: list[int], threads: list[int | None], repeats: int) -> list[dict]:
    "so8lab.tasks.sample_tasks samples/s per split, batch size and thread count (None = GPU)."
    rows = []
    for thread_count in threads:
        if thread_count is not None: torch.set_num_threads(thread_count)
        for split in SPLITS:
            for n in batch_sizes:
                median, times = time_median(lambda r: sample_tasks(n, split, seed=10 + r, device=device), repeats, device)
                rows.append({"split": split, "device": device, "threads": thread_count, "batch_size": n,
                             "samples_per_s": n / median, "median_seconds": median, "repeats": repeats, "seconds": times})
    torch.set_num_threads(ALL_CORES)
    return rows


def environment(device: str, threads: list) -> dict:
    return {"device": device, "cpu_model": cpu_model(), "cpu_cores": ALL_CORES,
            "gpu_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "torch_version": torch.__version__, "numpy_version": np.__version__,
            "cuda_version": torch.version.cuda if device == "cuda" else None,
            "python_version": platform.python_version(), "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "thread_counts": threads}


def summarize(rows: list[dict], reference_rates: dict) -> dict:
    "Best rates of the `train` split and the SPEC §10 target checks, as numbers."
    reference_rate = reference_rates["train"]["samples_per_s"]
    train = [row for row in rows if row["split"] == "train"]
    best = lambda device, threads=None: max((row["samples_per_s"] for row in train if row["device"] == device
                                             and (threads is None or row["threads"] == threads)), default=None)
    one = best("cpu", 1)
    summary = {"reference_train_samples_per_s": reference_rate,
               "cpu_one_thread_train_samples_per_s": one,
               "cpu_all_cores_train_samples_per_s": best("cpu", ALL_CORES),
               "speedup_one_thread_vs_reference": one / reference_rate,
               "speedup_one_thread_vs_spec_reference_840": one / 840,
               "meets_one_thread_target": one >= TARGET_ONE_THREAD_TRAIN,
               "meets_speedup_target_vs_this_reference": one / reference_rate >= TARGET_SPEEDUP}
    gpu = best("cuda")
    if gpu is not None:
        summary.update(gpu_train_samples_per_s=gpu, gpu_train_grids_per_s=2 * gpu,
                       gpu_speedup_vs_reference=gpu / reference_rate, meets_gpu_target=2 * gpu >= 1e6)
    return summary


def markdown(results: list[dict]) -> str:
    "One markdown report (runs, table, target checks) for one or more result dicts."
    lines = ["# Task generation: `so8lab.tasks.sample_tasks` vs a per-sample numpy reference", ""]
    for r in results:
        gpu = f", GPU {r['gpu_name']} (CUDA {r['cuda_version']})" if r["gpu_name"] else ""
        load = r["load_average_1min"]
        lines.append(f"- **{r['device']} run**, {r['date_utc']}: CPU {r['cpu_model']} ({r['cpu_cores']} cores){gpu}; "
                     f"torch {r['torch_version']}, numpy {r['numpy_version']}, Python {r['python_version']}; "
                     f"1-min load average {load['before']:.2f} before, {load['after']:.2f} after"
                     + ("; quick smoke run" if r["quick"] else ""))
    lines += ["", "Rates in samples/s; one sample = input grid + output grid + program, so grids/s = 2 × samples/s. "
              "Reference: `benchmarks/reference_generator.py`, one grid at a time with numpy, 1 thread, same machine "
              "and run. Each rate = batch / median time of the repeats after a warm-up.", "",
              "| run | split | device | torch threads | batch | samples/s | reference samples/s | speed-up |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for row in r["rows"]:
            reference_rate = r["reference"][row["split"]]["samples_per_s"]
            threads = row["threads"] if row["threads"] is not None else "–"
            lines.append(f"| {r['device']} run | {row['split']} | {row['device']} | {threads} | {row['batch_size']:,} | "
                         f"{row['samples_per_s']:,.0f} | {reference_rate:,.0f} | {row['samples_per_s'] / reference_rate:,.1f}× |")
    lines += ["", f"Targets (SPEC §10): ≥ {TARGET_ONE_THREAD_TRAIN:,} samples/s for `train` on one CPU thread; "
              f"≥ {TARGET_SPEEDUP}× the reference implementation (SPEC measured {SPEC_REFERENCE_RATE} samples/s for "
              "the original one); millions of grids/s on a GPU.", ""]
    verdict = lambda ok: "met" if ok else "**not met**"
    for r in results:
        s = r["summary"]
        lines.append(f"- {r['device']} run, `train`, 1 CPU thread: {s['cpu_one_thread_train_samples_per_s']:,.0f} samples/s "
                     f"(≥ {TARGET_ONE_THREAD_TRAIN:,}: {verdict(s['meets_one_thread_target'])}); "
                     f"{s['speedup_one_thread_vs_reference']:,.1f}× this reference "
                     f"(≥ {TARGET_SPEEDUP}×: {verdict(s['meets_speedup_target_vs_this_reference'])}); "
                     f"{s['speedup_one_thread_vs_spec_reference_840']:,.0f}× SPEC's 840 samples/s")
        if "gpu_train_samples_per_s" in s:
            lines.append(f"- {r['device']} run, `train`, GPU: {s['gpu_train_samples_per_s']:,.0f} samples/s = "
                         f"{s['gpu_train_grids_per_s']:,.0f} grids/s (millions: {verdict(s['meets_gpu_target'])}); "
                         f"{s['gpu_speedup_vs_reference']:,.0f}× this reference")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON", help="only render these result files as one markdown report")
    args = parser.parse_args(argv)
    if args.combine:
        text = markdown([json.loads(p.read_text()) for p in args.combine])
        if args.markdown: args.markdown.write_text(text)
        print(text); return
    if args.device == "cuda" and not torch.cuda.is_available(): parser.error("--device cuda: CUDA is not available")

    if args.quick: reference_n, reference_repeats, repeats, check_n = 100, 2, 2, 100
    else: reference_n, reference_repeats, repeats, check_n = 3000, 5, 7, 2000
    cpu_sizes = [512, 2048] if args.quick else [4096, 16384, 65536]
    gpu_sizes = [65536] if args.quick else [65536, 262144, 1048576]
    threads = sorted({1, ALL_CORES})

    torch.set_num_threads(1)
    started, load_before = time.perf_counter(), load_average()
    agreement = check_agreement(check_n)
    if args.device == "cuda": agreement["cuda_equals_cpu"] = cuda_equals_cpu(4096)
    reference_rates = bench_reference(reference_n, reference_repeats)
    rows = bench_ours("cpu", cpu_sizes, threads, repeats)                 # CPU rows always (context on a GPU host)
    if args.device == "cuda": rows += bench_ours("cuda", gpu_sizes, [None], repeats)
    result = {"benchmark": "tasks", **environment(args.device, threads), "quick": args.quick,
              "load_average_1min": {"before": load_before, "after": load_average()},
              "reference": reference_rates, "rows": rows, "agreement": agreement,
              "summary": summarize(rows, reference_rates),
              "targets": {"one_thread_train_samples_per_s": TARGET_ONE_THREAD_TRAIN, "speedup": TARGET_SPEEDUP,
                          "spec_reference_samples_per_s": SPEC_REFERENCE_RATE},
              "wall_seconds": time.perf_counter() - started}
    text = markdown([result])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
