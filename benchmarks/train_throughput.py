"""End-to-end training throughput: data generation + one training step (forward, proposed loss, backward, AdamW).

    python benchmarks/train_throughput.py --threads 1 --batch-size 64 --steps 100 --json

prints one JSON object with `samples_per_s` and `n_params` for the ~1M-parameter configuration: d_model 128,
patch size 2 (16 cell tokens + 9 program tokens), 2 encoder layers and 1 decoder layer with MLP ratio 2, SAE width
1536 (968,470 parameters; the per-token layers hold about 60% of them, the SAE on the pooled h about 40%).
`--config default` measures `ModelConfig()` (1.16M parameters, patch size 1, 3 layers) for comparison. Batches come from `GroupedBatchSampler` (2 composition groups,
generated on the fly for every step, as in training), the loss is the proposed objective (task + share + SAE +
primitive), and the step is `so8lab.training`'s own. Timing starts after `--warmup` steps; on CUDA the device is
synchronised at every step (as the trainer does). The reference implementation measured 225 samples/s end to end
at batch 64 on one thread of this CPU with 1.16M parameters (SPEC §10), so the target is >= 675 samples/s.
"""
import argparse, datetime, json, os, platform, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")   # host waits on the GPU
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def profile_steps(trainer, first: int, steps: int, device: str) -> dict:
    "Per-step breakdown of `steps` more training steps under torch.profiler: wall and GPU time, kernel launches, host syncs, top ops."
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for step in range(first, first + steps):
            trainer._train_step(step)
            if device == "cuda": torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps
    events = profiler.key_averages()
    count = lambda names: sum(e.count for e in events if e.key in names) / steps
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / steps
    top = sorted((e for e in events if e.device_type.name == "CPU" and not e.key.startswith("cuda")), key=lambda e: -e.cpu_time_total)[:12]
    return {"steps": steps, "wall_ms_per_step_profiled": 1000 * wall, "gpu_kernel_ms_per_step": gpu_us / 1000,
            "kernel_launches_per_step": count(LAUNCHES), "host_syncs_per_step": count(SYNCS),
            "device_to_host_copies_per_step": sum(e.count for e in events if e.key == "cudaMemcpyAsync") / steps,
            "top_cpu_ops_ms_per_step": {e.key: round(e.cpu_time_total / 1000 / steps, 3) for e in top}}


def measure(threads: int, batch_size: int, steps: int, warmup: int, device: str, config_overrides: dict, profile: bool = False) -> dict:
    import torch
    torch.set_num_threads(threads)
    from so8lab.models import GridModel, ModelConfig, count_parameters
    from so8lab.tasks import GroupedBatchSampler, sample_tasks
    from so8lab.training import Trainer, TrainConfig
    from so8lab.provenance import cpu_name
    if batch_size % 2: raise SystemExit(f"--batch-size must be even (two composition groups), got {batch_size}")
    torch.manual_seed(0)
    config = ModelConfig(**config_overrides)
    model = GridModel(config).to(device)
    sampler = GroupedBatchSampler(groups=2, group_size=batch_size // 2, device=device)
    train = TrainConfig(steps=warmup + steps, share_k=min(16, batch_size // 2 - 1), warmup_steps=1, amp=True)
    trainer = Trainer(model, train, sampler, sample_tasks(16, "val", device=device), device=device, progress=False)
    for step in range(warmup): trainer._train_step(step)
    if device == "cuda": torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer._train_step(step)
        if device == "cuda": torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    breakdown = profile_steps(trainer, warmup + steps, min(steps, 20), device) if profile else None
    return {"profile": breakdown, "samples_per_s": batch_size * steps / seconds, "seconds_per_step": seconds / steps, "n_params": count_parameters(model),
            "model": {k: getattr(config, k) for k in ("encoder", "d_model", "layers", "patch_size", "sae_width", "conditioning")},
            "batch_size": batch_size, "steps": steps, "warmup": warmup, "threads": threads, "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0], "reference_samples_per_s": 225.0,
            "speedup_vs_reference": batch_size * steps / seconds / 225.0,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="1m", choices=["1m", "default"], help="1m: patch 2, 2 layers; default: ModelConfig()")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--profile", action="store_true", help="after timing, profile up to 20 more steps: GPU time, launches, host syncs")
    arguments = parser.parse_args(argv)
    overrides = {"patch_size": 2, "layers": 2, "mlp_ratio": 2.0, "sae_width": 1536} if arguments.config == "1m" else {}
    result = measure(arguments.threads, arguments.batch_size, arguments.steps, arguments.warmup, arguments.device, overrides, arguments.profile)
    text = json.dumps(result, indent=1)
    if arguments.out: arguments.out.parent.mkdir(parents=True, exist_ok=True); arguments.out.write_text(text + "\n")
    if arguments.json: print(text)
    else: print(f"{result['samples_per_s']:.0f} samples/s ({result['n_params']:,} parameters, {result['device_name']})")


if __name__ == "__main__":
    main()
