"""Steady-state step time of H5's plan-size dual encoders (B0: InfoNCE only; proposed: + the share loss), after the
kernels' autotuning, and a torch.profiler table of 32 proposed steps: where a step's time goes. Prints its results
(the GPU log is committed as results/dual_encoder_steps_gpu.log).

    PYTHONPATH=. python benchmarks/dual_encoder_steps.py               # GPU
    PYTHONPATH=. python benchmarks/dual_encoder_steps.py --smoke        # a few steps on the CPU (tests/test_bench_dual_encoder.py)
"""
import argparse, datetime, platform, time, torch
from torch.profiler import profile, ProfilerActivity
from so8lab.induction import get_retrieval_preset
from so8lab.retrieval import train_dual_encoder

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--smoke", action="store_true", help="CPU, 2/4-step runs: checks the script, measures nothing")
args = parser.parse_args()
device = "cpu" if args.smoke else "cuda"
warm_steps, short_steps, long_steps, profiled_steps = (2, 2, 4, 2) if args.smoke else (64, 64, 320, 32)
settings = get_retrieval_preset("plan")
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
print(f"{name}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; plan dual encoder "
      f"d_model {settings.config.d_model}, batch {settings.batch_size} in {settings.groups} groups, share k {settings.share_k}", flush=True)

def run(share:float, steps:int, seed:int=0)->float:
    "Seconds to train a plan-size dual encoder for `steps` steps (share weight `share`)."
    sync(); start = time.perf_counter()
    train_dual_encoder(settings.config, steps=steps, batch_size=settings.batch_size, groups=settings.groups, learning_rate=settings.learning_rate,
                       share_weight=share, share_k=settings.share_k, device=device, log_every=steps, seed=seed)
    sync(); return time.perf_counter() - start

for share in (0.0, 0.1):
    warm = run(share, warm_steps)                           # autotuning and first-call work
    short, long = run(share, short_steps, 1), run(share, long_steps, 1)
    per_step = (long - short) / (long_steps - short_steps)
    print(f"share {share}: first {warm_steps} steps {warm:.1f} s; steady state {per_step * 1000:.1f} ms/step "
          f"(8000 steps ≈ {per_step * 8000:.0f} s)", flush=True)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
with profile(activities=activities) as profiled: run(0.1, profiled_steps, 2)
print(profiled.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
