"""The share loss's batched eigendecomposition, backend against backend in one process.

The proposed objective takes the top-k eigenvectors of one D x D covariance per composition group on every step
(`so8lab.losses.topk_projector`): 4 groups for one run of the plan preset, 12 for a batched group of three. This times
`torch.linalg.eigh` of [batch, 128, 128] float32 matrices with cuSOLVER (PyTorch's default), MAGMA, and on the host
(copy to the CPU, eigh there, copy back), each as the median of `--repeats` calls after a warm-up, and checks that
every backend's eigenvalues agree with a float64 CPU reference. On a machine without CUDA only the host row runs.
"""
import argparse, datetime, json, platform, statistics, time
import torch


def timed(function, repeats:int, cuda:bool)->float:
    "Median milliseconds of `function` over `repeats` calls after one warm-up call (synchronised on CUDA)."
    function()
    times = []
    for _ in range(repeats):
        if cuda: torch.cuda.synchronize()
        started = time.perf_counter(); function()
        if cuda: torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def covariances(batch:int, size:int, device)->torch.Tensor:
    "Sample covariances of 256 Gaussian rows each, as the share loss builds them: [batch, size, size] float32."
    rows = torch.randn(batch, 256, size, generator=torch.Generator().manual_seed(batch)).to(device)
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred.mT @ centred / 255


def main(argv=None)->dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the results here")
    arguments = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows = []
    for batch in arguments.batches:
        matrices = covariances(batch, arguments.size, device)
        reference = torch.linalg.eigvalsh(matrices.cpu().double())
        peers = {"host (copy, CPU eigh, copy back)": lambda: [v.to(device) for v in torch.linalg.eigh(matrices.cpu())]}
        if cuda:
            def on(library):
                def call():
                    torch.backends.cuda.preferred_linalg_library(library)
                    try: return torch.linalg.eigh(matrices)
                    finally: torch.backends.cuda.preferred_linalg_library("default")
                return call
            peers = {"cuSOLVER (default)": on("cusolver"), "MAGMA": on("magma"), **peers}
        for name, call in peers.items():
            values = call()[0].double().cpu()
            rows.append({"backend": name, "batch": batch, "size": arguments.size, "ms": timed(call, arguments.repeats, cuda),
                         "max_eigenvalue_error": float((values - reference).abs().max())})
    result = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(), "torch": torch.__version__,
              "python": platform.python_version(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "repeats": arguments.repeats, "rows": rows}
    lines = ["| backend | matrices | ms per call | max eigenvalue error |", "|---|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['batch']} x {r['size']}x{r['size']} | {r['ms']:.2f} | {r['max_eigenvalue_error']:.1e} |" for r in rows]
    if arguments.json:
        with open(arguments.json, "w") as handle: json.dump(result, handle, indent=1)
    print("\n".join(lines))
    return result


if __name__ == "__main__": main()
