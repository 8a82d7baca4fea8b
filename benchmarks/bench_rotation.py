"""Fused SO(8) block rotation vs PyTorch formulations and peft's OFT rotation, on one GPU.

Run from the repository root (GPU machine, the project on PYTHONPATH rather than installed):

    PYTHONPATH=. python benchmarks/bench_rotation.py --out benchmarks/results

Writes bench_rotation.json (every number, plus device, versions, date and the GPU correctness checks) and
bench_rotation.md (the tables). Timing: `triton.testing.do_bench`, median, L2 flushed before every call.
Bandwidth: bytes that must move (forward reads x and writes y: 2·N·d·s; forward+backward adds reading x and dy
and writing dx: 5·N·d·s) over the time, as a share of a device-to-device copy measured in the same run.
Every peer builds its rotations from the parameters on each call, as a layer does; `einsum (M given)` times
the product alone. The script keeps to a time budget and records what it skipped.
"""
import argparse, datetime, gc, importlib.metadata, json, math, os, platform, time, traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # large shapes after many graphs fragment the cache

import torch
import triton
from triton.testing import do_bench

from so8lab.kernels import block_rotation, clip_errors, rotation_errors, rotation_matrices, rotation_matrices_reference
from so8lab.rotations import vec_to_skew

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WIDTHS = (384, 768, 1024, 4096)
ROWS = (512, 16384, 262144)
HEADLINE = (65536, 768)


def version(name):
    try: return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError: return None


def median_us(fn, warmup=10, rep=40):
    return 1000 * do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth():
    "Bytes read + written per second by a 2 GiB device-to-device copy."
    src = torch.empty(2**29, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    seconds = median_us(lambda: dst.copy_(src), rep=100) / 1e6
    return 2 * src.numel() * 4 / seconds


def blend(A, gate, dtype):
    "(1 - g) I + g R with R from the PyTorch exp map (no host sync), cast to the activation dtype."
    g = gate[:, None, None]
    return ((1 - g) * torch.eye(8, device=A.device) + g * rotation_matrices_reference(A)).to(dtype)


def dense_from_blocks(M):
    blocks = M.shape[0]
    index = torch.arange(blocks, device=M.device)
    W = M.new_zeros(blocks, 8, blocks, 8)
    W[index, :, index, :] = M
    return W.reshape(8 * blocks, 8 * blocks)


def peft_module(blocks, width, dtype):
    "peft's OFTRotationModule (block-diagonal Cayley-Neumann rotation applied by einsum), or None."
    try:
        from peft.tuners.oft.layer import OFTRotationModule
    except Exception as error:
        print("peft OFTRotationModule unavailable:", repr(error)[:200], flush=True)
        return None
    module = OFTRotationModule(r=blocks, n_elements=28, block_size=8, in_features=width)
    torch.nn.init.normal_(module.weight, std=0.05)
    return module.to("cuda", dtype)


def geotorch_module(blocks):
    try:
        import geotorch.so
    except Exception:
        return None
    module = geotorch.so.SO((blocks, 8, 8), triv="expm").cuda()
    module.base.copy_(torch.eye(8, device="cuda").expand(blocks, 8, 8))
    return module


class Compiled:
    "torch.compile of the broadcast formulation sum_k x[n,b,k,None] * M[b,k,:], one compile per dtype (dynamic shapes)."
    def __init__(self):
        self.apply = torch.compile(lambda x, M: (x.unflatten(-1, (-1, 8))[..., None] * M).sum(-2).flatten(-2), dynamic=True)


def peers(x, A, gate, compiled, extras):
    "name -> (function of nothing returning the output, leaves to differentiate)."
    N, d = x.shape
    blocks, dtype = d // 8, x.dtype
    M_given = blend(A, gate, dtype).detach().requires_grad_()
    table = {
        "fused": (lambda: block_rotation(x, A, gate), (x, A, gate)),
        "einsum": (lambda: torch.einsum("nbk,bkj->nbj", x.view(N, blocks, 8), blend(A, gate, dtype)).reshape(N, d), (x, A, gate)),
        "einsum (M given)": (lambda: torch.einsum("nbk,bkj->nbj", x.view(N, blocks, 8), M_given).reshape(N, d), (x, M_given)),
        "bmm": (lambda: torch.bmm(x.view(N, blocks, 8).transpose(0, 1), blend(A, gate, dtype)).transpose(0, 1).reshape(N, d), (x, A, gate)),
        "dense": (lambda: x @ dense_from_blocks(blend(A, gate, dtype)), (x, A, gate)),
    }
    if compiled is not None:
        table["torch.compile"] = (lambda: compiled.apply(x, blend(A, gate, dtype)), (x, A, gate))
    if extras.get("peft") is not None:
        table["peft OFT"] = (lambda: extras["peft"](x), (x, extras["peft"].weight))
    if extras.get("geotorch") is not None:
        table["geotorch SO"] = (lambda: torch.einsum("nbk,bkj->nbj", x.view(N, blocks, 8), extras["geotorch"](extras["geotorch_X"]).to(dtype)).reshape(N, d), (x, extras["geotorch_X"]))
    return table


def no_grad_call(fn):
    with torch.no_grad(): return fn()


def time_peer(fn, leaves, dy, mode):
    "(eager µs, CUDA-graph-replay µs or None): the second is device time alone, free of Python and launch overhead."
    call = (lambda: no_grad_call(fn)) if mode == "fwd" else (lambda: torch.autograd.grad(fn(), leaves, dy))
    eager = median_us(call)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side): call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph): call()
        replay = median_us(graph.replay)
        del graph
    except Exception:
        torch.cuda.synchronize()
        replay = None
    return eager, replay


def kernel_profile(step, repeats=5):
    "Device time per kernel (µs per call of `step`) from torch.profiler."
    from torch.profiler import ProfilerActivity, profile
    step(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats): step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0: rows.append(dict(kernel=event.key[:90], us_per_step=total / repeats, calls_per_step=event.count / repeats))
    return sorted(rows, key=lambda r: -r["us_per_step"])[:15]


def gpu_checks():
    "Correctness on this GPU: every dtype and some awkward shapes, no host sync, graph capture."
    checks = {"rotation": {}, "clip": {}, "errors": []}
    # widths that are not multiples of 16 compile a second specialisation: kept to bfloat16 and float32 (compile time)
    shapes = {"bfloat16": ((4099, 776), (512, 8), (65536, 768)), "float32": ((65536, 768),), "float16": ((65536, 768),)}
    for dtype, sizes in shapes.items():
        for rows, width in sizes:
            try: checks["rotation"][f"{dtype} {rows}x{width}"] = rotation_errors(dtype, rows, width, device="cuda")
            except Exception: checks["errors"].append(f"rotation {dtype} {rows}x{width}: {traceback.format_exc()[-1500:]}")
        if dtype == "float16": continue  # same code path as bfloat16; saves compilations
        try: checks["clip"][f"{dtype} 1000x128"] = clip_errors(dtype, 1000, 128, device="cuda")
        except Exception: checks["errors"].append(f"clip {dtype} 1000x128: {traceback.format_exc()[-1500:]}")
    try: checks.update(sync_and_graph_checks())
    except Exception: checks["errors"].append(f"sync/graph: {traceback.format_exc()[-1500:]}")
    return checks


def sync_and_graph_checks():
    checks = {}
    x = torch.randn(8192, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (0.1 * torch.randn(96, 28, device="cuda")).requires_grad_()
    gate = torch.full((96,), 0.5, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    step = lambda: torch.autograd.grad(block_rotation(x, A, gate), (x, A, gate), dy)
    eager = step()
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
        checks["no_host_sync"] = True
    except RuntimeError as error:
        checks["no_host_sync"] = repr(error)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): captured = step()
    graph.replay()
    torch.cuda.synchronize()
    checks["cuda_graph_max_abs_diff"] = max(float((c.float() - e.float()).abs().max()) for c, e in zip(captured, eager))
    return checks


def bound(dtype):
    return {"float32": 1e-5, "bfloat16": 4e-3, "float16": 5e-4, "float64": 1e-12}[dtype]


def checks_passed(checks):
    ok = all(e["y"] <= bound(k.split()[0]) and e["dx"] <= bound(k.split()[0]) and max(e["dA"], e["dgate"], e["R"], e["dA_R"]) <= 1e-4
             for k, e in checks["rotation"].items())
    ok &= all(e["loss"] <= 1e-5 and e["da"] <= 2 * bound(k.split()[0]) and e["db"] <= 2 * bound(k.split()[0]) for k, e in checks["clip"].items())
    return bool(ok and checks.get("no_host_sync") is True and checks.get("cuda_graph_max_abs_diff") == 0.0)


def construction_rows(extras_for, rows_out):
    "R construction alone, forward and forward+backward, for each width."
    for width in WIDTHS:
        blocks = width // 8
        A = (0.5 * torch.randn(blocks, 28, device="cuda")).requires_grad_()
        weights = torch.randn(blocks, 8, 8, device="cuda")
        candidates = {"fused (Triton exp)": (lambda: rotation_matrices(A, backend="triton"), (A,)),
                      "expm_so8 (PyTorch)": (lambda: rotation_matrices_reference(A), (A,)),
                      "torch.linalg.matrix_exp": (lambda: torch.linalg.matrix_exp(vec_to_skew(A)), (A,))}
        module = extras_for(blocks, width, torch.float32).get("peft")
        if module is not None:
            candidates["peft Cayley-Neumann"] = (lambda: module._cayley_batch(module.weight, 8, True, 5), (module.weight,))
        for name, (fn, leaves) in candidates.items():
            for mode in ("fwd", "fwd+bwd"):
                try: eager, replay = time_peer(lambda: fn() * weights, leaves, torch.ones_like(weights), mode)
                except Exception as error: print("construction", name, mode, repr(error)[:200]); continue
                rows_out.append(dict(kind="construction", d=width, blocks=blocks, peer=name, mode=mode, us=replay if replay is not None else eager, us_eager=eager, us_graph=replay))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new shapes after this many seconds")
    parser.add_argument("--quick", action="store_true", help="headline shape only")
    parser.add_argument("--render", help="only rewrite the markdown of an existing results JSON")
    parser.add_argument("--previous", help="with --render: a results JSON whose R-construction rows fill a run that ended before them")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        previous = json.loads(Path(args.previous).read_text()) if args.previous else None
        Path(args.render).with_suffix(".md").write_text(markdown(result, previous=previous))
        return
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    props = torch.cuda.get_device_properties(0)
    result = dict(device=torch.cuda.get_device_name(0), multiprocessors=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, peft=version("peft"), geotorch=version("geotorch"), python=platform.python_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), rows=[], skipped=[], errors=[],
                  allocator=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    save = lambda: (out / "bench_rotation.json").write_text(json.dumps(result, indent=1))
    try:
        result["checks"] = gpu_checks()
        result["checks_passed"] = checks_passed(result["checks"]) and not result["checks"]["errors"]
    except Exception:
        result["checks"], result["checks_passed"] = {"crash": traceback.format_exc()[-3000:]}, False
    print(json.dumps(result["checks"], indent=1)[-6000:], flush=True)
    print("checks passed:", result["checks_passed"], f"({time.time() - start:.0f} s)", flush=True)
    result["copy_TBps"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth {result['copy_TBps']:.2f} TB/s", flush=True)
    save()
    compiled = Compiled()
    extras_for = lambda blocks, width, dtype: {"peft": peft_module(blocks, width, dtype)}
    shapes = [(dt, *HEADLINE) for dt in DTYPES] + ([] if args.quick else
             [(dt, N, d) for dt in DTYPES for d in WIDTHS for N in ROWS if (N, d) != HEADLINE])
    for dtype_name, N, d in shapes:
        if time.time() - start > args.budget_s:
            result["skipped"].append(f"{dtype_name} {N}x{d}"); continue
        dtype, blocks = DTYPES[dtype_name], d // 8
        x = torch.randn(N, d, device="cuda", dtype=dtype, requires_grad=True)
        A = (0.5 * torch.randn(blocks, 28, device="cuda")).requires_grad_()
        gate = torch.rand(blocks, device="cuda").requires_grad_()
        dy = torch.randn_like(x)
        extras = extras_for(blocks, d, dtype)
        if (N, d) == HEADLINE:
            extras["geotorch"] = geotorch_module(blocks)
            extras["geotorch_X"] = (0.1 * torch.randn(blocks, 8, 8, device="cuda")).requires_grad_()
        size = N * d * x.element_size()
        for name, (fn, leaves) in peers(x, A, gate, compiled, extras).items():
            for mode, nbytes in (("fwd", 2 * size), ("fwd+bwd", 5 * size)):
                if size >= 2**30:   # GiB-sized activations: return the last peer's graph pool and buffers first (else float32 262144x4096 ran out)
                    gc.collect(); torch.cuda.empty_cache()
                try:
                    eager, replay = time_peer(fn, leaves, dy, mode)
                except Exception as error:
                    result["errors"].append(f"{name} {mode} {dtype_name} {N}x{d}: {repr(error)[:300]}")
                    if name == "torch.compile": traceback.print_exc()
                    continue
                us = replay if replay is not None else eager
                pct = 100 * nbytes / (us * 1e-6) / (result["copy_TBps"] * 1e12)
                result["rows"].append(dict(kind="rotation", dtype=dtype_name, N=N, d=d, peer=name, mode=mode, us=us, us_eager=eager,
                                           us_graph=replay, pct_copy=pct, pct_copy_eager=100 * nbytes / (eager * 1e-6) / (result["copy_TBps"] * 1e12)))
        if (N, d) == HEADLINE:
            import so8lab.kernels as kernels
            result.setdefault("autotune", {})[dtype_name] = {name: {str(key): str(config) for key, config in getattr(kernels, name).cache.items()}
                                                             for name in ("_rotation_forward_kernel", "_rotation_backward_kernel")}
            try:
                result.setdefault("profile", {})[dtype_name] = {
                    "fwd": kernel_profile(lambda: no_grad_call(lambda: block_rotation(x, A, gate))),
                    "fwd+bwd": kernel_profile(lambda: torch.autograd.grad(block_rotation(x, A, gate), (x, A, gate), dy))}
            except Exception:
                result["errors"].append("profile: " + traceback.format_exc()[-500:])
        del x, dy, extras, fn, leaves  # the last peer's closure and leaves hold x: free them before the next shape
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{dtype_name} {N}x{d} done ({time.time() - start:.0f} s)", flush=True)
        save()
    if time.time() - start < args.budget_s + 60:
        construction_rows(extras_for, result["rows"])
    else:
        result["skipped"].append("R construction")
    result["elapsed_s"] = time.time() - start
    save()
    (out / "bench_rotation.md").write_text(markdown(result))
    print(markdown(result, short=True))


def markdown(result, short=False, previous=None):
    "Tables: headline, then every shape (fused % of copy bandwidth and each peer's time), then R construction."
    rows = [r for r in result["rows"] if r["kind"] == "rotation"]
    us = lambda r: f"{r['us']:.1f}" + ("*" if r.get("us_graph", 0) is None else "")
    names = list(dict.fromkeys(r["peer"] for r in rows))
    lines = [f"# Fused SO(8) block rotation benchmark", "",
             f"{result['device']} ({result['multiprocessors']} SMs), torch {result['torch']}, triton {result['triton']}, peft {result['peft']}, geotorch {result['geotorch']}, {result['date']}.",
             f"Copy bandwidth (read + write, same session): {result['copy_TBps']:.2f} TB/s. Median of triton.testing.do_bench, L2 flushed before each call.",
             f"GPU correctness checks passed: {result['checks_passed']}.", ""]
    find = {(r["dtype"], r["N"], r["d"], r["mode"], r["peer"]): r for r in rows}
    N, d = HEADLINE
    lines += ["Times are CUDA-graph replays (device time: each peer captured once, replayed under do_bench) unless marked *eager* "
              "(plain Python calls; this VM's launch overhead, tens of µs per kernel, then dominates small shapes). "
              "Speed-ups are peer time / fused time. `*`: graph capture failed (always for geotorch, whose matrix_exp synchronises; a few others once), eager time shown.", "",
              f"## Headline: {N}x{d}", "", "| dtype | mode | fused µs | fused % copy | fused µs eager | fused % copy eager | " + " | ".join(f"× vs {p}" for p in names if p != "fused") + " |",
              "|" + "---|" * (6 + len(names) - 1)]
    for dtype in DTYPES:
        for mode in ("fwd", "fwd+bwd"):
            fused = find.get((dtype, N, d, mode, "fused"))
            if fused is None: continue
            ratios = [f"{find[(dtype, N, d, mode, p)]['us'] / fused['us']:.1f}" if (dtype, N, d, mode, p) in find else "–" for p in names if p != "fused"]
            lines.append(f"| {dtype} | {mode} | {fused['us']:.1f} | {fused['pct_copy']:.0f}% | {fused['us_eager']:.1f} | {fused['pct_copy_eager']:.0f}% | " + " | ".join(ratios) + " |")
    if short: return "\n".join(lines)
    lines += ["", "## All shapes (µs, graph replay; fused also eager and as % of copy bandwidth)", "",
              "| dtype | mode | d | N | fused % copy | fused eager | " + " | ".join(names) + " |", "|" + "---|" * (6 + len(names))]
    for dtype in DTYPES:
        for mode in ("fwd", "fwd+bwd"):
            for width in WIDTHS:
                for rows_ in sorted({r["N"] for r in rows}):
                    fused = find.get((dtype, rows_, width, mode, "fused"))
                    if fused is None: continue
                    cells = [us(find[(dtype, rows_, width, mode, p)]) if (dtype, rows_, width, mode, p) in find else "–" for p in names]
                    lines.append(f"| {dtype} | {mode} | {width} | {rows_} | {fused['pct_copy']:.0f}% | {fused['us_eager']:.1f} | " + " | ".join(cells) + " |")
    construction = [r for r in result["rows"] if r["kind"] == "construction"]
    expected = [(dt, N_, w) for dt in DTYPES for w in WIDTHS for N_ in ROWS] + [(dt, *HEADLINE) for dt in DTYPES]
    missing = [f"{dt} {N_}x{w}" for dt, N_, w in expected if not any(r["dtype"] == dt and r["N"] == N_ and r["d"] == w for r in rows)]
    if not construction and previous is not None:
        construction = [r for r in previous["rows"] if r["kind"] == "construction"]
        lines += ["", f"This run ended before the R-construction timings (CUDA out of memory when allocating the last shape, {', '.join(missing) or 'none'}); "
                      f"the table below comes from the previous run ({previous['date']}, same device type, same R kernels)."]
    elif missing:
        lines += ["", "Shapes missing from this run: " + ", ".join(missing)]
    if construction:
        cnames = list(dict.fromkeys(r["peer"] for r in construction))
        cfind = {(r["d"], r["mode"], r["peer"]): r["us"] for r in construction}
        lines += ["", "## R construction alone (µs, graph replay where capturable; float32 parameters)", "", "| d | blocks | mode | " + " | ".join(cnames) + " |", "|" + "---|" * (3 + len(cnames))]
        for width in WIDTHS:
            for mode in ("fwd", "fwd+bwd"):
                lines.append(f"| {width} | {width // 8} | {mode} | " + " | ".join(f"{cfind[(width, mode, p)]:.1f}" if (width, mode, p) in cfind else "–" for p in cnames) + " |")
    for dtype, modes in result.get("profile", {}).items():
        for mode, kernels in modes.items():
            lines += ["", f"## Kernels of the fused path, {dtype} {mode} at {N}x{d} (torch.profiler, µs per call)", "", "| kernel | µs | calls |", "|---|---|---|"]
            lines += [f"| {k['kernel']} | {k['us_per_step']:.1f} | {k['calls_per_step']:.0f} |" for k in kernels]
    if result["skipped"]: lines += ["", "Skipped (time budget): " + ", ".join(result["skipped"])]
    if result["errors"]: lines += ["", "Errors:", *[f"- {e}" for e in result["errors"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
