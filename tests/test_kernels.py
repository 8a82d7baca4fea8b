"""Tests of so8lab.kernels that need a fresh interpreter (Triton's CPU interpreter is chosen at import time),
hypothesis, or an environment without Triton. The notebook nbs/04_kernels.ipynb holds the worked examples."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st

from so8lab.kernels import block_rotation, block_rotation_reference, clip_loss, clip_loss_reference, interpreted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(code, **env):
    "Run `code` in a fresh Python (with extra environment variables) and return its last stdout line as JSON."
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, "PYTHONPATH": ROOT, **env},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def numpy_block_rotation(x, vec, gate):
    "Brute force in float64: loop over blocks, scipy's expm of the skew matrix built entry by entry."
    rows, cols = np.triu_indices(8, 1)
    y = np.empty_like(x)
    for block in range(vec.shape[0]):
        skew = np.zeros((8, 8))
        for k, (i, j) in enumerate(zip(rows, cols)):
            skew[i, j], skew[j, i] = vec[block, k], -vec[block, k]
        blend = (1 - gate[block]) * np.eye(8) + gate[block] * scipy.linalg.expm(skew)
        y[..., 8 * block:8 * block + 8] = x[..., 8 * block:8 * block + 8] @ blend
    return y


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 5), lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), scale=st.sampled_from([0.0, 0.1, 1.0, 8.0]),
       scalar_gate=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_matches_brute_force(blocks, lead, scale, scalar_gate, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, 8 * blocks))
    vec = scale * rng.standard_normal((blocks, 28))
    gate = np.full(blocks, rng.uniform()) if scalar_gate else rng.uniform(size=blocks)
    gate_arg = torch.tensor(gate[0]) if scalar_gate else torch.tensor(gate)
    y = block_rotation(torch.tensor(x), torch.tensor(vec), gate_arg)  # CPU: the reference path
    np.testing.assert_allclose(y.numpy(), numpy_block_rotation(x, vec, gate), rtol=1e-10, atol=1e-10)


def test_clip_reference_matches_brute_force():
    rng = np.random.default_rng(1)
    a, b, scale = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)), 2.7
    logits = scale * a @ b.T
    row = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(7)])
    col = np.mean([np.log(np.exp(logits[:, j]).sum()) - logits[j, j] for j in range(7)])
    assert abs(clip_loss(torch.tensor(a), torch.tensor(b), scale).item() - (row + col) / 2) < 1e-12


def test_rotation_kernels_in_interpreter_many_shapes():
    # one row, one block; partial tiles; three column tiles with a partial last one; row programs with no tile
    expression = ("{f'{d} {n}x{w}': rotation_errors(d, n, w, seed=n) for d in ('float32', 'bfloat16', 'float16', 'float64') "
                  "for n, w in ((1, 8), (129, 24), (70, 136), (300, 8))}")
    bounds = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3, "float64": 1e-12}
    for key, errors in interpreted(expression).items():
        dtype = key.split()[0]
        assert errors["y"] <= bounds[dtype] and errors["dx"] <= bounds[dtype], (key, errors)
        parameter_bound = 1e-12 if dtype == "float64" else 2e-5
        assert max(errors["dA"], errors["dgate"], errors["R"], errors["dA_R"]) <= parameter_bound, (key, errors)


def test_triton_paths_in_interpreter_gradients_subsets_and_large_angles():
    results = run_script("""
        import json, torch
        from so8lab.kernels import *
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 37, 24, generator=g, dtype=torch.float64)
        vec = torch.randn(3, 28, generator=g, dtype=torch.float64)
        gate = torch.tensor(0.3, dtype=torch.float64)
        out = {}
        y = block_rotation(x, vec, gate, backend="triton")
        out["leading_dims"] = max_relative_error(y, block_rotation_reference(x, vec, gate))
        # only parameters need gradients (no dx written), then only x (no dM accumulated)
        for name, wants in (("params_only", (False, True, True)), ("x_only", (True, False, False))):
            grads, refs = [], []
            for backend, store in (("triton", grads), ("reference", refs)):
                leaves = [t.clone().requires_grad_(w) for t, w in zip((x, vec, gate), wants)]
                y = block_rotation(*leaves, backend=backend)
                store.extend(torch.autograd.grad(y, [t for t in leaves if t.requires_grad], torch.ones_like(y)))
            out[name] = max(max_relative_error(a, b) for a, b in zip(grads, refs))
        # large angles need many squarings: ||A||_F up to ~300
        big = 40 * torch.randn(16, 28, generator=g, dtype=torch.float64)
        out["large_angles"] = max_relative_error(rotation_matrices(big, backend="triton"), rotation_matrices_reference(big))
        print(json.dumps(out))
    """, TRITON_INTERPRET="1")
    assert results["leading_dims"] < 1e-13, results
    assert results["params_only"] < 1e-12 and results["x_only"] < 1e-12, results
    assert results["large_angles"] < 1e-10, results


def test_clip_kernels_in_interpreter_shapes():
    # resident tiles (D <= 256), then the chunked path: 64-feature chunks and 256-feature gradient slices, the last of each
    # partial at D = 300, exact at 512 and 1024 (four slices); N <= 64 keeps one row tile
    expression = ("{f'{d} {n}x{k}': clip_errors(d, n, k, seed=n) for d in ('float32', 'bfloat16', 'float16', 'float64') "
                  "for n, k in ((1, 3), (65, 17), (130, 64), (64, 300), (40, 512), (2, 257), (16, 1024))}")
    bounds = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3, "float64": 1e-12}
    for key, errors in interpreted(expression).items():
        dtype = key.split()[0]
        assert errors["loss"] <= (1e-12 if dtype == "float64" else 1e-5) and errors["dscale"] <= (1e-12 if dtype == "float64" else 1e-5), (key, errors)
        assert errors["da"] <= bounds[dtype] and errors["db"] <= bounds[dtype], (key, errors)


def test_full_gradcheck_in_interpreter():
    assert interpreted("gradcheck_kernels(fast=False)") == {"block_rotation": True, "rotation_matrices": True, "clip_loss": True, "clip_loss_wide": True}


def test_chunked_clip_gradcheck_several_projections():
    # D > BLOCK_D = 64 on the chunked path (D = 300: five chunks, two gradient slices), N = 5 < BLOCK_M: gradcheck's fast mode
    # with five different random projections; the full Jacobian (3,001 columns) would take minutes in the interpreter
    results = run_script("""
        import json, torch
        from so8lab.kernels import clip_loss
        g = torch.Generator().manual_seed(7)
        a, b = (0.2 * torch.randn(5, 300, generator=g, dtype=torch.float64)).requires_grad_(), (0.2 * torch.randn(5, 300, generator=g, dtype=torch.float64)).requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        out = []
        for seed in range(5):
            torch.manual_seed(seed)
            out.append(torch.autograd.gradcheck(lambda *t: clip_loss(*t, backend="triton"), (a, b, scale), fast_mode=True))
        print(json.dumps(out))
    """, TRITON_INTERPRET="1")
    assert results == [True] * 5


def test_chunked_and_resident_paths_agree():
    # the same data through both paths: D = 256 stays resident; zero-padding it to 300 features takes the chunked path
    results = run_script("""
        import json, torch
        from so8lab.kernels import clip_loss, max_relative_error
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(70, 256, generator=g, dtype=torch.float64), torch.randn(70, 256, generator=g, dtype=torch.float64)
        pad = lambda t: torch.nn.functional.pad(t, (0, 44))
        out = {}
        for name, (x, y) in (("resident", (a, b)), ("chunked", (pad(a), pad(b)))):
            leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(0.1, dtype=torch.float64, requires_grad=True)]
            loss = clip_loss(*leaves, backend="triton")
            da, db, ds = torch.autograd.grad(loss, leaves)
            out[name] = [loss, da[:, :256], db[:, :256], ds, torch.cat([da[:, 256:], db[:, 256:]])]
        print(json.dumps([max_relative_error(c, r) for c, r in zip(out["chunked"][:4], out["resident"][:4])] + [float(out["chunked"][4].abs().max())]))
    """, TRITON_INTERPRET="1")
    assert max(results[:4]) < 1e-13 and results[4] == 0.0, results


def test_module_imports_and_falls_back_without_triton():
    results = run_script("""
        import json, sys, torch
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import so8lab.kernels as kernels
        x, vec = torch.randn(4, 16), torch.randn(2, 28)
        y = kernels.block_rotation(x, vec, 0.5)
        try:
            kernels.block_rotation(x, vec, backend="triton"); message = ""
        except RuntimeError as error:
            message = str(error)
        print(json.dumps([kernels.HAS_TRITON, list(y.shape), message]))
    """)
    assert results == [False, [4, 16], "backend='triton' needs the triton package"]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"backend must be one of \[.*\], got 'cuda'"): block_rotation(torch.zeros(1, 8), torch.zeros(1, 28), backend="cuda")
    with pytest.raises(ValueError, match="multiple of 8"): block_rotation(torch.zeros(1, 7), torch.zeros(1, 28))
    with pytest.raises(TypeError, match="a and b must have the same dtype"): clip_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="a must be a non-empty"): clip_loss_reference(torch.zeros(0, 3), torch.zeros(0, 3), 1.0)
    with pytest.raises(ValueError, match="supports D <= 1024"): clip_loss(torch.zeros(2, 1025), torch.zeros(2, 1025), 1.0, backend="triton")
