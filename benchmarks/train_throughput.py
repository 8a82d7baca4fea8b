"""End-to-end training throughput and time to competence: data generation + the training step of `so8lab.training`.

One measurement (prints one JSON object):

    python benchmarks/train_throughput.py --threads 1 --batch-size 64 --steps 100 --json

measures `--steps` steps after `--warmup` steps of the ~1M-parameter configuration (d_model 128, patch size 2,
2 encoder layers and 1 decoder layer with MLP ratio 2, SAE width 1536: 967,702 parameters) with the proposed
objective; `--config default` measures `ModelConfig()`, the plan model (1.16M parameters, patch size 1, 73 tokens
per sample). Batches come from `GroupedBatchSampler` (`--groups` composition groups, generated on the device for
every step, as in training). The device is synchronised once after the timed steps (a trainer that synchronises
inside its step, like the old one, pays for it in its own time). `--source DIR` imports `so8lab` from DIR
instead of this checkout: the way to run an older engine side by side (e.g. `git archive <commit> so8lab | tar -x -C DIR`).
`--engine` picks the new trainer's forward pass: `eager`, `compiled` (CUDA graphs) or `auto` (the trainer's default).
`--competence` trains instead until the first validation with exact match >= `--target` on `val` and reports
`time_to_competence_s` (wall time from the trainer's construction, compilation and validations included).

The GPU suite runs every peer side by side in one session and writes one JSON with the headline figures:

    python benchmarks/train_throughput.py --suite --device cuda --source .bench/old --out results/train_engine_gpu.json
"""
import argparse, datetime, json, os, platform, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")   # host waits on the GPU
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")
ONE_MILLION = {"patch_size": 2, "layers": 2, "mlp_ratio": 2.0, "sae_width": 1536}
TOKENS = {"1m": 16 + 9, "default": 64 + 9}                                           # encoder tokens per sample
COMPILE = {"auto": None, "eager": False, "compiled": True}                           # --engine as the trainer's `compile`


def profile_steps(train_step, first: int, steps: int, device: str) -> dict:
    "Per-step breakdown of `steps` more training steps under torch.profiler: wall and GPU time, kernel launches, host syncs, top ops."
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for step in range(first, first + steps): train_step(step)
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


def _import(source):
    "Put `source` (a directory holding so8lab/) first on the path; this checkout when None."
    sys.path.insert(0, str(Path(source).resolve() if source else ROOT))


def _setup(arguments, steps: int, seed=None, **train_overrides):
    "Model, sampler and trainer of one measurement (imports so8lab from `--source`)."
    import torch
    torch.set_num_threads(arguments.threads)
    from so8lab.models import GridModel, ModelConfig
    from so8lab.tasks import GroupedBatchSampler, sample_tasks
    from so8lab.training import Trainer, TrainConfig
    from so8lab.experiments import METHODS
    if arguments.batch_size % arguments.groups:
        raise SystemExit(f"--batch-size must be a multiple of --groups ({arguments.groups}), got {arguments.batch_size}")
    seed = arguments.seed if seed is None else seed
    torch.manual_seed(seed)
    model = GridModel(ModelConfig(**(ONE_MILLION if arguments.config == "1m" else {}))).to(arguments.device)
    sampler = GroupedBatchSampler(seed=seed, groups=arguments.groups, group_size=arguments.batch_size // arguments.groups, device=arguments.device)
    method = dict(METHODS[arguments.method].train)
    train = TrainConfig(**{**method, "steps": steps, "share_k": min(16, arguments.batch_size // arguments.groups - 1),
                           "warmup_steps": 1, "amp": True, **train_overrides})
    validation = sample_tasks(arguments.val_size, "val", seed=seed, device=arguments.device)
    options = {} if arguments.source else {"compile": COMPILE[arguments.engine]}
    return model, Trainer(model, train, sampler, validation, device=arguments.device, progress=False, **options)


def _environment(arguments) -> dict:
    import torch
    from so8lab.provenance import cpu_name
    return {"device": arguments.device, "device_name": torch.cuda.get_device_name() if arguments.device == "cuda" else cpu_name(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": arguments.threads,
            "load_average_1min": os.getloadavg()[0], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure(arguments) -> dict:
    "Samples per second of `--steps` training steps after `--warmup` (and an optional profile)."
    import torch
    _import(arguments.source)
    from so8lab.models import count_parameters
    started = time.perf_counter()
    total = arguments.warmup + arguments.steps + (20 if arguments.profile else 0)
    model, trainer = _setup(arguments, total)
    train_step, compiled = trainer._train_step, getattr(trainer, "compiled", False)
    if arguments.runs > 1:                                  # one batched model of `runs` seeds (RunGroup)
        from so8lab.training import RunGroup
        group = RunGroup([trainer] + [_setup(arguments, total, seed=arguments.seed + r)[1] for r in range(1, arguments.runs)],
                         compile=COMPILE[arguments.engine])
        everyone = list(range(arguments.runs))
        train_step, compiled = (lambda step: group._step(step, everyone)), group.compiled
    for step in range(arguments.warmup): train_step(step)
    if arguments.device == "cuda": torch.cuda.synchronize()
    warm_seconds, started = time.perf_counter() - started, time.perf_counter()
    for step in range(arguments.warmup, arguments.warmup + arguments.steps): train_step(step)
    if arguments.device == "cuda": torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    breakdown = profile_steps(train_step, arguments.warmup + arguments.steps, min(arguments.steps, 20), arguments.device) if arguments.profile else None
    parameters = count_parameters(model)
    rate = arguments.runs * arguments.batch_size * arguments.steps / seconds
    return {"samples_per_s": rate, "runs": arguments.runs, "samples_per_s_per_run": rate / arguments.runs, "seconds_per_step": seconds / arguments.steps, "setup_and_warmup_s": warm_seconds,
            "n_params": parameters, "model_gflop_per_s": rate * 6 * parameters * TOKENS[arguments.config] / 1e9,
            "profile": breakdown, "engine": "source " + arguments.source if arguments.source else arguments.engine,
            "compiled": bool(compiled), "method": arguments.method, "config": arguments.config,
            "batch_size": arguments.batch_size, "groups": arguments.groups, "steps": arguments.steps, "warmup": arguments.warmup,
            **_environment(arguments)}


class Competent(Exception): "Raised by the validation hook once the target is reached."


def competence(arguments) -> dict:
    "Train until val exact match >= --target (or --max-seconds): wall time, steps and the validation curve."
    import torch
    _import(arguments.source)
    started = time.perf_counter()
    model, trainer = _setup(arguments, arguments.max_steps, learning_rate=arguments.learning_rate,
                            warmup_steps=arguments.lr_warmup, eval_every=arguments.eval_every, targets=())
    def check(step):
        if trainer.state["history"][-1]["exact_match"] >= arguments.target or time.perf_counter() - started > arguments.max_seconds:
            raise Competent
    trainer.on_validate = check
    try: trainer.fit()
    except Competent: pass
    wall = time.perf_counter() - started
    last = trainer.state["history"][-1]
    reached = last["exact_match"] >= arguments.target
    return {"time_to_competence_s": wall if reached else None, "reached": reached, "wall_s": wall, "step": last["step"],
            "samples": last["step"] * arguments.batch_size, "train_seconds": trainer.state["train_seconds"],
            "seconds_per_step": trainer.state["train_seconds"] / max(1, last["step"]), "val": last,
            "curve": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in trainer.state["history"]],
            "events": trainer.state["events"], "method": arguments.method, "config": arguments.config, "batch_size": arguments.batch_size,
            "groups": arguments.groups, "learning_rate": arguments.learning_rate, "max_steps": arguments.max_steps,
            "eval_every": arguments.eval_every, "val_size": arguments.val_size, "target": arguments.target,
            "compiled": bool(getattr(trainer, "compiled", False)), **_environment(arguments)}


def matmul_rate(size: int = 8192) -> float:
    "Measured bf16 matrix-product rate of this GPU (TFLOP/s, median of 10 after 3 warm-ups, random data)."
    import torch
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for repeat in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); a @ b; end.record(); torch.cuda.synchronize()
        if repeat >= 3: times.append(start.elapsed_time(end) / 1000)
    return 2 * size ** 3 / sorted(times)[len(times) // 2] / 1e12


def _child(arguments, *extra) -> dict:
    "Run one measurement in a fresh process (peers never share a CUDA context or compiled caches in memory)."
    command = [sys.executable, __file__, "--json", "--device", arguments.device, "--config", "default", "--threads", str(arguments.threads), *extra]
    print("$", " ".join(command[1:]), flush=True)
    try: result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=arguments.child_timeout)
    except subprocess.TimeoutExpired as error: return {"error": f"timed out after {arguments.child_timeout} s", "arguments": list(extra)}
    if result.returncode: return {"error": result.stderr[-3000:], "arguments": list(extra)}
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    print({k: payload.get(k) for k in ("samples_per_s", "time_to_competence_s", "step", "engine", "method", "batch_size")}, flush=True)
    return payload


def suite(arguments) -> dict:
    "Every peer of the engine benchmark on one device, side by side, with the headline figures."
    import torch
    _import(None)
    rate = matmul_rate() if arguments.device == "cuda" else None
    previous = json.loads(arguments.out.read_text()) if arguments.out and arguments.out.exists() else {}
    result = {"bf16_matmul_tflops": rate, "model": "ModelConfig() (the plan model)", "throughput": previous.get("throughput", []),
              "competence": previous.get("competence", {}), **_environment(arguments)}
    def save():
        if arguments.out: arguments.out.parent.mkdir(parents=True, exist_ok=True); arguments.out.write_text(json.dumps(result, indent=1) + "\n")
    for method in arguments.methods.split(",") if "throughput" in arguments.parts else ():
        peers = []
        for spec in arguments.peers.split(","):                  # engine:batch[:runs][:profile], engine 'source' = --source
            engine, batch, *rest = spec.split(":")
            if engine == "source" and not arguments.source: continue
            runs = int(rest[0]) if rest and rest[0].isdigit() else 1
            peers.append((engine, arguments.source if engine == "source" else None, int(batch), "profile" in rest, runs))
        for engine, source, batch, profiled, runs in peers:
            extra = ["--method", method, "--batch-size", str(batch), "--groups", str(max(2, batch // 128)), "--steps", str(arguments.steps),
                     "--warmup", str(arguments.warmup), "--runs", str(runs)] + (["--source", source] if source else ["--engine", engine]) + \
                    (["--profile"] if profiled else [])
            row = _child(arguments, *extra)
            if rate and "samples_per_s" in row: row["share_of_bf16_matmul_rate"] = row["model_gflop_per_s"] / 1e3 / rate
            result["throughput"].append(row); save()
    for method in arguments.methods.split(",") if "competence" in arguments.parts else ():
        result["competence"][method] = _child(arguments, "--competence", "--method", method, "--batch-size", "1024", "--groups", "8",
                                              "--learning-rate", "3e-3", "--max-steps", "8000", "--eval-every", "250", "--val-size", "2000",
                                              "--max-seconds", str(arguments.max_seconds), "--engine", "compiled")
        save()
    best = max((row for row in result["throughput"] if "samples_per_s" in row), key=lambda row: row["samples_per_s"], default=None)
    result["aggregate_samples_per_s"] = best and best["samples_per_s"]
    result["aggregate_note"] = "the fastest row: samples/s summed over the runs of one process (RunGroup rows train several seeds as one batched model)"
    result["time_to_competence_s"] = {method: row.get("time_to_competence_s") for method, row in result["competence"].items()}
    save()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--groups", type=int, default=2, help="composition groups per batch")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=1, help="train this many seeds as one batched model (so8lab.training.RunGroup)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="1m", choices=["1m", "default"], help="1m: patch 2, 2 layers; default: ModelConfig()")
    parser.add_argument("--method", default="proposed", choices=["proposed", "B0"], help="the objective (experiments.METHODS)")
    parser.add_argument("--engine", default="auto", choices=["auto", "eager", "compiled"], help="the new trainer's forward pass")
    parser.add_argument("--source", help="import so8lab from this directory (an older engine) instead of the checkout")
    parser.add_argument("--val-size", type=int, default=16, help="validation samples")
    parser.add_argument("--competence", action="store_true", help="train to --target val exact match and time it")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--lr-warmup", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=8000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--max-seconds", type=float, default=240)
    parser.add_argument("--suite", action="store_true", help="run every peer side by side (subprocesses) and write --out")
    parser.add_argument("--parts", default="throughput,competence", help="which parts of the suite to run (results merge into --out)")
    parser.add_argument("--methods", default="B0,proposed", help="the suite's methods")
    parser.add_argument("--peers", default="source:512:profile,eager:512,compiled:512:profile,compiled:4096,compiled:1024:5,compiled:1024:10",
                        help="the suite's throughput rows: engine:batch[:runs][:profile], engine one of source, eager, compiled")
    parser.add_argument("--child-timeout", type=float, default=300, help="seconds allowed to each measurement of the suite")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--profile", action="store_true", help="after timing, profile up to 20 more steps: GPU time, launches, host syncs")
    arguments = parser.parse_args(argv)
    result = suite(arguments) if arguments.suite else competence(arguments) if arguments.competence else measure(arguments)
    text = json.dumps(result, indent=1)
    if arguments.out and not arguments.suite: arguments.out.parent.mkdir(parents=True, exist_ok=True); arguments.out.write_text(text + "\n")
    if arguments.json: print(text)
    elif "samples_per_s" in result: print(f"{result['samples_per_s']:.0f} samples/s ({result['n_params']:,} parameters, {result['device_name']})")
    else: print(text)


if __name__ == "__main__":
    main()
