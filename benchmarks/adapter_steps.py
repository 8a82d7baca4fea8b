"""One adaptation step of every method on the few-shot Pareto curve, side by side in one process.

The Pareto study (`so8lab.fewshot.PARETO_METHODS`) adapts the same base model by LoRA at four ranks, the SO(8)
rotation gated and ungated (our fused Triton kernel on CUDA), the lightweight SO(8) adapter, full fine-tuning and
peft's OFT, HRA and RoAd on the same two bottleneck layers. This times one optimizer step (forward, task loss,
backward, AdamW) on one support set of `--shots` examples with a preset's model, as the median of `--repeats` steps
after `--warmup` steps, and reports each method's trainable parameters and, after those steps at the rate the
study uses, the orthogonality error of the blocks it applies (`so8lab.adapters.orthogonality_error`).
"""
import argparse, datetime, json, platform, statistics, time
import torch
import torch.nn.functional as F


def step_function(model, parameters, support, learning_rate:float):
    "One AdamW step of the task loss (per-cell cross-entropy) on `support`, as `so8lab.fewshot.adapt` trains."
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model.forward_batch(support).logits, support.outputs.long())
        loss.backward()
        optimizer.step()
    return step


def timed(step, warmup:int, repeats:int, cuda:bool)->float:
    "Median milliseconds of one call of `step` over `repeats` calls after `warmup` calls (synchronised on CUDA)."
    for _ in range(warmup): step()
    times = []
    for _ in range(repeats):
        if cuda: torch.cuda.synchronize()
        started = time.perf_counter(); step()
        if cuda: torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main(argv=None)->dict:
    from so8lab.adapters import orthogonality_error
    from so8lab.experiments import run_configs
    from so8lab.fewshot import LEARNING_RATES, PARETO_METHODS, adaptable_copy, adaptation_sets, adapter_variant, fewshot_compositions
    from so8lab.models import GridModel, count_parameters
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="plan", help="the model of this experiment preset (plan: the GPU study's)")
    parser.add_argument("--methods", nargs="+", default=list(PARETO_METHODS))
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None, help="write the results here")
    arguments = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    base = GridModel(run_configs("proposed", arguments.preset)[0]).to(device).eval()
    support = adaptation_sets(fewshot_compositions(1)[0], 0, arguments.shots, 1, device)["support"]
    rows = []
    for method in arguments.methods:
        model = adaptable_copy(base, method)
        trainable = [p for p in model.parameters() if p.requires_grad]
        ms = timed(step_function(model, trainable, support, LEARNING_RATES[adapter_variant(method)[0]]), arguments.warmup, arguments.repeats, cuda)
        errors = list(orthogonality_error(model).values())
        rows.append({"method": method, "parameters": count_parameters(model), "ms_per_step": ms,
                     "orthogonality_error": max(errors) if errors else None})
    import peft
    result = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(), "torch": torch.__version__,
              "peft": peft.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(), "preset": arguments.preset,
              "shots": arguments.shots, "warmup": arguments.warmup, "repeats": arguments.repeats,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    lines = ["| method | trainable parameters | ms per step | orthogonality error |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['parameters']} | {r['ms_per_step']:.2f} | "
              f"{'' if r['orthogonality_error'] is None else format(r['orthogonality_error'], '.1e')} |" for r in rows]
    if arguments.json:
        with open(arguments.json, "w") as handle: json.dump(result, handle, indent=1)
    print("\n".join(lines))
    return result


if __name__ == "__main__": main()
