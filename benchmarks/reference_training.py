"""The public reference implementation (moro-qq82/mutual_concept_loss) timed with its own training loop and generator.

    git -C <mirror> archive HEAD src | tar -x -C .bench/reference        # the reference's source, unmodified
    python benchmarks/reference_training.py --reference .bench/reference --steps 200 --json

Two figures, on one CPU thread: end-to-end training samples/s of the reference's `Trainer.fit` (its default
`SharedAutoencoderModel`, 1,164,300 parameters; its `LossManager` of task + shared-subspace + sparse-autoencoder
losses; Adam; its grouped `DataLoader` over `SyntheticTaskDataset`, which generates every sample on demand; one
evaluation batch at the end, as its loop always validates at the last step), and its generator's samples/s
(`SyntheticTaskDataset[i]` for fresh indices). `--peer` adds so8lab's figures measured in the same process
right after: `train_throughput.py`'s step (`--config`, proposed objective, batch `--batch-size`) and
`sample_tasks`. So the ratios compare measurements of one run on one machine, never a stored figure.
"""
import argparse, datetime, json, os, platform, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reference_training(source: Path, steps: int, batch_size: int) -> dict:
    "Samples per second of the reference's own `Trainer.fit` for `steps` steps (generation included)."
    import torch
    sys.path.insert(0, str(source / "src"))
    from mutual_concept_loss import (CheckpointConfig, LoggingConfig, LossManager, SharedAutoencoderModel, SharedSubspaceLoss,
                                     SparseAutoencoderLoss, TaskLoss, Trainer, TrainingConfig, set_seed)
    set_seed(0)
    model = SharedAutoencoderModel()
    losses = LossManager(TaskLoss(), SharedSubspaceLoss(), SparseAutoencoderLoss())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingConfig(train_samples=steps * batch_size, val_samples=batch_size, batch_size=batch_size, max_steps=steps,
                                  device="cpu", eval_batches=1)
        logging = LoggingConfig(output_dir=Path(scratch), enable_tensorboard=False, enable_csv=False, eval_interval=10 ** 9,
                                log_interval=10 ** 9, save_config=False)
        trainer = Trainer(model, losses, optimizer, training, logging, CheckpointConfig())
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    return {"samples_per_s": steps * batch_size / seconds, "seconds": seconds, "steps": steps, "batch_size": batch_size,
            "n_params": sum(p.numel() for p in model.parameters())}


def reference_generation(source: Path, samples: int) -> dict:
    "Samples per second of the reference's `SyntheticTaskDataset` (each index generated afresh)."
    sys.path.insert(0, str(source / "src"))
    from mutual_concept_loss import SyntheticTaskDataset
    dataset = SyntheticTaskDataset(num_samples=samples, seed=0)
    started = time.perf_counter()
    for index in range(samples): dataset[index]
    return {"samples_per_s": samples / (time.perf_counter() - started), "samples": samples}


def so8lab_figures(arguments) -> dict:
    "so8lab's end-to-end training step and `sample_tasks`, measured in this process after the reference."
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput
    from so8lab.tasks import sample_tasks
    step = train_throughput.measure(argparse.Namespace(
        threads=1, batch_size=arguments.batch_size, groups=2, steps=arguments.steps, warmup=5, seed=0, device="cpu",
        config=arguments.config, method="proposed", engine="auto", source=None, val_size=16, runs=1, profile=False))
    sample_tasks(1000, "train", seed=1)                                   # warm-up
    started = time.perf_counter()
    sample_tasks(arguments.generation_samples * 10, "train", seed=2)
    generation = arguments.generation_samples * 10 / (time.perf_counter() - started)
    return {"training_samples_per_s": step["samples_per_s"], "training_config": arguments.config, "n_params": step["n_params"],
            "generation_samples_per_s": generation}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, default=ROOT / ".bench" / "reference", help="a directory holding the reference's src/")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generation-samples", type=int, default=2000)
    parser.add_argument("--config", default="1m", choices=["1m", "default"], help="so8lab's configuration for --peer")
    parser.add_argument("--peer", action="store_true", help="also measure so8lab in this process")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args(argv)
    if not (arguments.reference / "src" / "mutual_concept_loss").is_dir():
        raise SystemExit(f"--reference must hold src/mutual_concept_loss, got {arguments.reference}")
    import torch
    torch.set_num_threads(1)
    result = {"reference_training": reference_training(arguments.reference, arguments.steps, arguments.batch_size),
              "reference_generation": reference_generation(arguments.reference, arguments.generation_samples)}
    if arguments.peer:
        result["so8lab"] = so8lab_figures(arguments)
        result["training_ratio"] = result["so8lab"]["training_samples_per_s"] / result["reference_training"]["samples_per_s"]
        result["generation_ratio"] = result["so8lab"]["generation_samples_per_s"] / result["reference_generation"]["samples_per_s"]
    from so8lab.provenance import cpu_name
    result.update(device=cpu_name(), torch=torch.__version__, python=platform.python_version(), threads=1,
                  load_average_1min=os.getloadavg()[0], date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    text = json.dumps(result, indent=1)
    if arguments.out: arguments.out.parent.mkdir(parents=True, exist_ok=True); arguments.out.write_text(text + "\n")
    print(text if arguments.json else {k: v for k, v in result.items() if "ratio" in k})


if __name__ == "__main__":
    main()
