"""Fused symmetric InfoNCE (CLIP) loss vs the PyTorch reference and torch.compile of it, forward + backward, on one GPU.

Run from the repository root (GPU machine, the project on PYTHONPATH rather than installed):

    PYTHONPATH=. python benchmarks/bench_infonce.py --out benchmarks/results

CPU smoke run (tiny shapes; the fused path runs in Triton's interpreter, timings mean nothing; tests/test_bench_infonce.py):

    PYTHONPATH=. python benchmarks/bench_infonce.py --cpu-smoke --out /tmp/infonce

Writes bench_infonce.json (every number, plus device, versions, date, the correctness checks and what the time budget
skipped) and bench_infonce.md (the tables). Peers, all differentiated in a, b and logit_scale:

- fused: `clip_loss(backend="triton")`, online log-sum-exp kernels that never store the N×N logits;
- reference: `clip_loss_reference`, which materialises the float32 N×N logits (16 GiB at N = 65536) and lets
  autograd keep its softmaxes;
- torch.compile: `torch.compile(clip_loss_reference, dynamic=True)`, Inductor by default.

Time: one forward + backward (`torch.autograd.grad(loss, (a, b, logit_scale))`), median of `triton.testing.do_bench`
(L2 flushed before each call). Peak memory: `torch.cuda.max_memory_allocated()` during one forward + backward, after
`reset_peak_memory_stats()`, minus the memory allocated just before it: everything the loss adds to its inputs,
the three gradients it returns included. Reported in bytes and in bytes per N·D element: O(N·D) memory means that
number stays flat as N grows (the reference's grows like N).

Matmul work: the *essential* count, 6·N²·D floating-point operations per forward + backward: the logits a·bᵀ once in
forward (2·N²·D; the reference computes them once and takes rows and columns from the same matrix) and the two
gradient products da = s·G·b and db = s·Gᵀ·a in backward (2·N²·D each). The fused kernels execute more (the logits
twice in forward, for rows and for columns, and again in each backward kernel and each 256-feature gradient slice,
plus the low half of G for 16-bit inputs); the JSON records that count as `fused_flops_executed`. Each peer's rate is
essential FLOPs / time, and its share is that rate over a `torch.matmul` rate measured in the same run for an
[N, D] × [D, N] product in the same dtype (bfloat16: tensor cores; float32: torch's default float32 precision,
recorded; the fused float32 path uses tf32x3 tensor-core products, so its share can exceed 100%). The `float32-tf32`
rows run every peer, and the matmul rate, under `torch.set_float32_matmul_precision('high')`: cuBLAS (the reference's
and torch.compile's products) then uses TF32, and so do the fused kernels (one tf32 pass); its error bounds are those
of 10-bit mantissas. At small D that
product writes N² outputs and is partly memory-bound; the measured rate is what it is.

Correctness, per configuration: the fused loss and gradients against the reference's (when it ran) and both against
an exact float64 evaluation done in row chunks (closed-form gradients, no N×N matrix), as max relative errors.

Targets (issue 14): at N = 65536 the fused forward + backward at least 2× as fast as the reference, and fused peak
memory O(N·D). An out-of-memory peer is recorded as such, not as a crash.
"""
import argparse, contextlib, datetime, gc, json, math, os, platform, sys, time, traceback
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before so8lab.kernels is imported: its kernels then run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # 16 GiB logits next to freed ones fragment the cache

import torch
import triton
from triton.testing import do_bench

from so8lab.kernels import clip_loss, clip_loss_reference, max_relative_error

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float32-tf32": torch.float32}
PRECISIONS = {"float32-tf32": "high"}   # torch.set_float32_matmul_precision for every peer of that dtype (default: 'highest')
ROWS = (4096, 16384, 65536)
DIMS = (128, 512)
HEADLINE_ROWS = 65536
SMOKE_ROWS, SMOKE_DIMS = (16, 80), (8, 300)   # 80: two row tiles, the second partial; D = 300 takes the chunked kernel path
SCALE = 1 / 0.07
BOUNDS = {"bfloat16": dict(loss=1e-5, dscale=1e-4, da=8e-3, db=8e-3), "float32": dict(loss=1e-5, dscale=1e-4, da=1e-4, db=1e-4),
          "float32-tf32": dict(loss=1e-3, dscale=1e-2, da=3e-2, db=3e-2)}   # one tf32 pass: 10-bit mantissas in the logits
PEERS = ("fused", "reference", "torch.compile")


@contextlib.contextmanager
def matmul_precision(setting):
    "torch.set_float32_matmul_precision(setting) inside the block (the fused kernels follow it for float32, as cuBLAS does)."
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try: yield
    finally: torch.set_float32_matmul_precision(before)


def time_ms(fn, device):
    "Median milliseconds of fn(): do_bench on CUDA; on CPU (smoke runs) one call, timed by the host clock."
    if device == "cuda": return do_bench(fn, warmup=25, rep=100, return_mode="median")
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def sync(device):
    if device == "cuda": torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device == "cuda": torch.cuda.empty_cache()


def is_oom(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def peak_bytes(fn, device):
    "Extra bytes allocated at the peak of one call of fn (its outputs included); None on CPU."
    if device != "cuda": return None
    free(device); sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def make_inputs(N, D, dtype, device, seed=0):
    "Unit-norm embedding pairs (as CLIP normalises them) and the logit scale 1/0.07, all leaves."
    generator = torch.Generator(device=device).manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(N, D, device=device, generator=generator), dim=-1).to(dtype).requires_grad_()
    return unit(), unit(), torch.tensor(SCALE, device=device, requires_grad=True)


def step(loss_fn, a, b, scale):
    "One forward + backward: (loss, da, db, dscale)."
    loss = loss_fn(a, b, scale)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, scale)))


def chunked_float64(a, b, scale, chunk=4096):
    "(loss, da, db, dscale) in float64 from the closed forms, logits built `chunk` rows at a time (never N×N)."
    a, b, s = a.detach().double(), b.detach().double(), scale.detach().double()
    N = a.shape[0]
    lse = lambda q, k: torch.cat([torch.logsumexp(s * q[i:i + chunk] @ k.T, dim=1) for i in range(0, N, chunk)])
    lse_rows, lse_cols = lse(a, b), lse(b, a)
    diag = s * (a * b).sum(1)
    loss = (lse_rows.mean() + lse_cols.mean()) / 2 - diag.mean()
    da, db, dscale = torch.empty_like(a), torch.zeros_like(b), torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, N, chunk):
        raw = a[i:i + chunk] @ b.T
        logits = s * raw
        g = torch.exp(logits - lse_rows[i:i + chunk, None]) + torch.exp(logits - lse_cols[None, :])
        g[torch.arange(g.shape[0]), torch.arange(i, i + g.shape[0])] -= 2
        g /= 2 * N
        da[i:i + chunk] = s * g @ b
        db += s * g.T @ a[i:i + chunk]
        dscale += (g * raw).sum()
    return loss, da, db, dscale


def errors(got, want):
    return {name: max_relative_error(x, y) for name, x, y in zip(("loss", "da", "db", "dscale"), got, want)}


def check_configuration(N, D, dtype_name, a, b, scale, device):
    "Fused vs reference vs float64; returns the fused outputs' check record."
    check = dict(N=N, D=D, dtype=dtype_name, bounds=BOUNDS[dtype_name])
    fused = step(lambda *t: clip_loss(*t, backend="triton"), a, b, scale)
    truth = chunked_float64(a, b, scale)
    check["fused_vs_float64"] = errors(fused, truth)
    try:
        reference = step(clip_loss_reference, a, b, scale)
        check["fused_vs_reference"] = errors(fused, reference)
        check["reference_vs_float64"] = errors(reference, truth)
        del reference
    except Exception as error:
        if not is_oom(error): raise
        check["fused_vs_reference"] = check["reference_vs_float64"] = "reference out of memory"
    check["passed"] = all(check["fused_vs_float64"][k] <= bound for k, bound in BOUNDS[dtype_name].items())
    del fused, truth
    free(device)
    return check


def fused_flops_executed(N, D, dtype):
    "Matrix-product FLOPs the fused kernels execute: logits twice forward; per backward kernel, logits once per 256-feature slice, G·k once (twice for 16-bit: hi and lo)."
    slices = 1 if D <= 256 else math.ceil(D / 256)
    split = 2 if dtype in (torch.float16, torch.bfloat16) else 1
    return 2 * (2 * N * N * D) + 2 * (slices * 2 * N * N * D + split * 2 * N * N * D)


def matmul_rate(N, D, dtype, device):
    "FLOP/s of torch.matmul for an [N, D] × [D, N] product in `dtype`."
    x, y = torch.randn(N, D, device=device).to(dtype), torch.randn(D, N, device=device).to(dtype)
    ms = time_ms(lambda: x @ y, device)
    del x, y
    free(device)
    return 2 * N * N * D / (ms / 1000), ms


def run_configuration(N, D, dtype_name, device, compiled, result):
    dtype = DTYPES[dtype_name]
    a, b, scale = make_inputs(N, D, dtype, device)
    result["checks"].append(check_configuration(N, D, dtype_name, a, b, scale, device))
    rate, matmul_ms = matmul_rate(N, D, dtype, device)
    result["matmul"].append(dict(N=N, D=D, dtype=dtype_name, ms=matmul_ms, tflops=rate / 1e12))
    essential = 6 * N * N * D
    peers = {"fused": lambda *t: clip_loss(*t, backend="triton"), "reference": clip_loss_reference}
    if compiled is not None: peers["torch.compile"] = compiled
    for name, loss_fn in peers.items():
        call = lambda: step(loss_fn, a, b, scale)
        row = dict(N=N, D=D, dtype=dtype_name, peer=name, status="ok", ms=None, peak_bytes=None, bytes_per_ND=None,
                   essential_flops=essential, tflops=None, pct_matmul=None)
        if name == "fused": row["fused_flops_executed"] = fused_flops_executed(N, D, dtype)
        try:
            started = time.time()
            call(); sync(device)        # compiles (torch.compile, Triton autotuning) outside the timed calls
            row["first_call_s"] = time.time() - started
            row["peak_bytes"] = peak_bytes(call, device)
            row["ms"] = time_ms(call, device)
        except Exception as error:
            row["status"] = "out of memory" if is_oom(error) else "error"
            row["error"] = repr(error)[:300]
            if row["status"] == "error": result["errors"].append(f"{name} {dtype_name} N={N} D={D}: {traceback.format_exc()[-1500:]}")
        free(device)
        if row["peak_bytes"] is not None: row["bytes_per_ND"] = row["peak_bytes"] / (N * D)
        if row["ms"] is not None:
            row["tflops"] = essential / (row["ms"] / 1000) / 1e12
            row["pct_matmul"] = 100 * essential / (row["ms"] / 1000) / rate
        result["rows"].append(row)
    del a, b, scale
    free(device)


def targets(result):
    "Speed-up of fused over reference (and torch.compile) at the headline N, and fused bytes per N·D across N."
    find = {(r["N"], r["D"], r["dtype"], r["peer"]): r for r in result["rows"]}
    headline = max((r["N"] for r in result["rows"]), default=None)
    verdicts = {"headline_N": headline, "speedup": {}, "fused_bytes_per_ND": {}}
    for (N, D, dtype, peer), row in find.items():
        fused = find.get((N, D, dtype, "fused"))
        if N == headline and peer != "fused" and fused is not None and fused["ms"]:
            verdicts["speedup"][f"{dtype} D={D} vs {peer}"] = row["ms"] / fused["ms"] if row["ms"] else row["status"]
        if peer == "fused" and row["bytes_per_ND"] is not None:
            verdicts["fused_bytes_per_ND"].setdefault(f"{dtype} D={D}", {})[N] = row["bytes_per_ND"]
    vs_reference = [v for k, v in verdicts["speedup"].items() if k.endswith("vs reference")]
    verdicts["speedup_vs_reference_at_least_2"] = (all(v >= 2 for v in vs_reference if isinstance(v, float))
                                                   if any(isinstance(v, float) for v in vs_reference) else None)
    flat = [max(per_n.values()) / min(per_n.values()) for per_n in verdicts["fused_bytes_per_ND"].values() if len(per_n) > 1]
    verdicts["fused_memory_O_ND"] = all(ratio < 1.5 for ratio in flat) if flat else None  # flat in N within 1.5×
    return verdicts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new configurations after this many seconds")
    parser.add_argument("--rows", type=int, nargs="+", help=f"N values (default {ROWS}; CPU smoke {SMOKE_ROWS})")
    parser.add_argument("--dims", type=int, nargs="+", help=f"D values (default {DIMS}; CPU smoke {SMOKE_DIMS})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; CPU smoke: eager, Dynamo alone)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fused path through TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available(): parser.error("no CUDA device: use --cpu-smoke")
    rows, dims = args.rows or (SMOKE_ROWS if args.cpu_smoke else ROWS), args.dims or (SMOKE_DIMS if args.cpu_smoke else DIMS)
    backend = args.compile_backend or ("eager" if args.cpu_smoke else "inductor")
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    props = torch.cuda.get_device_properties(0) if device == "cuda" else None
    result = dict(benchmark="infonce", mode="cpu-smoke" if args.cpu_smoke else "gpu",
                  device=torch.cuda.get_device_name(0) if props else platform.processor() or "cpu",
                  multiprocessors=props.multi_processor_count if props else None, gpu_memory_bytes=props.total_memory if props else None,
                  torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  triton_interpret=os.environ.get("TRITON_INTERPRET", "0"), compile_backend=None if args.no_compile else backend,
                  float32_matmul_precision=torch.get_float32_matmul_precision(), logit_scale=SCALE,
                  flop_count="essential: 6·N²·D per forward + backward (logits once, da and db once each)",
                  peak_memory="max_memory_allocated during one forward + backward minus allocated before, gradients included",
                  rows=[], matmul=[], checks=[], skipped=[], errors=[])
    save = lambda: (out / "bench_infonce.json").write_text(json.dumps(result, indent=1))
    compiled = None if args.no_compile else torch.compile(clip_loss_reference, dynamic=True, backend=backend)
    # the headline N first (the targets are read there), then the rest from small to large
    headline = max(rows)
    shapes = [(N, D, dt) for N in [headline, *sorted(n for n in rows if n != headline)] for D in dims for dt in args.dtypes]
    for N, D, dtype_name in shapes:
        if time.time() - start > args.budget_s:
            result["skipped"].append(f"{dtype_name} N={N} D={D}"); continue
        try:
            with matmul_precision(PRECISIONS.get(dtype_name, "highest")):
                run_configuration(N, D, dtype_name, device, compiled, result)
        except Exception:
            result["errors"].append(f"{dtype_name} N={N} D={D}: {traceback.format_exc()[-1500:]}")
            free(device)
        print(f"{dtype_name} N={N} D={D} done ({time.time() - start:.0f} s)", flush=True)
        save()
    if device == "cuda":
        import so8lab.kernels as kernels
        result["autotune"] = {name: {str(key): str(config) for key, config in getattr(kernels, name).cache.items()}
                              for name in ("_clip_lse_kernel", "_clip_grad_kernel")}
    result["targets"] = targets(result)
    result["checks_passed"] = bool(result["checks"]) and all(c["passed"] for c in result["checks"])
    result["elapsed_s"] = time.time() - start
    save()
    (out / "bench_infonce.md").write_text(markdown(result))
    print(markdown(result, short=True))


def markdown(result, short=False):
    "Headline speed-ups and memory, then every configuration, then the checks."
    t = result["targets"]
    fmt = lambda v, f: "–" if v is None else format(v, f)
    lines = ["# Fused InfoNCE (CLIP) loss benchmark: forward + backward", "",
             f"{result['device']} ({result['multiprocessors']} SMs), torch {result['torch']}, triton {result['triton']}, {result['date']}, mode {result['mode']}.",
             f"Median of triton.testing.do_bench. Rate: essential 6·N²·D FLOPs over the time, as a share of torch.matmul [N, D] × [D, N] "
             f"in the same dtype, same run (float32 matmul precision '{result['float32_matmul_precision']}'). torch.compile backend: {result['compile_backend']}.",
             f"Correctness checks passed: {result['checks_passed']}." + (" CPU smoke run: the fused path ran in Triton's interpreter; its times mean nothing." if result["mode"] == "cpu-smoke" else ""), "",
             f"## Targets at N = {t['headline_N']}", "",
             f"- fused ≥ 2× the reference: **{t['speedup_vs_reference_at_least_2']}** ("
             + ", ".join(f"{k}: {v:.2f}×" if isinstance(v, float) else f"{k}: {v}" for k, v in t["speedup"].items()) + ")",
             f"- fused peak memory O(N·D) (bytes per N·D element flat in N): **{t['fused_memory_O_ND']}** ("
             + "; ".join(f"{k}: " + ", ".join(f"{n}: {v:.1f}" for n, v in sorted(per_n.items())) for k, per_n in t["fused_bytes_per_ND"].items()) + ")"]
    if short: return "\n".join(lines)
    lines += ["", "## All configurations", "", "| N | D | dtype | peer | status | ms | ms / fused ms | peak MiB | bytes / N·D | TFLOP/s (6N²D) | % matmul |", "|" + "---|" * 11]
    find = {(r["N"], r["D"], r["dtype"], r["peer"]): r for r in result["rows"]}
    for r in sorted(result["rows"], key=lambda r: (r["dtype"], r["D"], r["N"], PEERS.index(r["peer"]))):
        fused = find.get((r["N"], r["D"], r["dtype"], "fused"))
        ratio = r["ms"] / fused["ms"] if r["ms"] and fused and fused["ms"] else None
        peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else None
        lines.append(f"| {r['N']} | {r['D']} | {r['dtype']} | {r['peer']} | {r['status']} | {fmt(r['ms'], '.3f')} | {fmt(ratio, '.2f')} | "
                     f"{fmt(peak, '.1f')} | {fmt(r['bytes_per_ND'], '.1f')} | {fmt(r['tflops'], '.1f')} | {fmt(r['pct_matmul'], '.0f')} |")
    lines += ["", "## torch.matmul [N, D] × [D, N]", "", "| N | D | dtype | ms | TFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {m['N']} | {m['D']} | {m['dtype']} | {m['ms']:.3f} | {m['tflops']:.1f} |" for m in result["matmul"]]
    lines += ["", "## Correctness (max relative error)", "", "| N | D | dtype | fused vs float64 (loss, da, db, dscale) | fused vs reference | passed |", "|---|---|---|---|---|---|"]
    show = lambda e: ", ".join(f"{v:.1e}" for v in e.values()) if isinstance(e, dict) else e
    lines += [f"| {c['N']} | {c['D']} | {c['dtype']} | {show(c['fused_vs_float64'])} | {show(c['fused_vs_reference'])} | {c['passed']} |" for c in result["checks"]]
    if result["skipped"]: lines += ["", "Skipped (time budget): " + ", ".join(result["skipped"])]
    if result["errors"]: lines += ["", "Errors:", *[f"- {e}" for e in result["errors"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
