"""Tests for so8lab.adapters against float64 references that share no code with it: scipy.linalg.expm of skew
matrices filled by an explicit index loop, dense scipy.linalg.block_diag matrices, numpy formulas, gradcheck.
Hypothesis settings come from conftest.py."""
import itertools
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

from so8lab.adapters import (ADAPTER_KINDS, PEFT_KINDS, AdaptedLinear, LightweightSO8Adapter, LoRA, PeftLinear, SO8Rotation,
                             SO8VisualAdapter, adapted_layers, adapter_parameters, attach_adapters, detach_adapters,
                             fold_rotation, freeze_base, merge_adapters, orthogonal_matrices, orthogonality_error,
                             unfold_rotation, unmerge_adapters)
from so8lab.models import GridModel, ModelConfig, count_parameters
from so8lab.rotations import orthogonality_error as matrix_orthogonality_error
from so8lab.tasks import sample_tasks

PAIRS = list(itertools.combinations(range(8), 2))
TINY = ModelConfig(d_model=32, bottleneck_dim=16, layers=2, heads=4, sae_width=24)
seeds = st.integers(0, 2**31 - 1)
gates = st.one_of(st.just(1.0), st.floats(0.05, 0.45), st.floats(0.55, 1.0))


def reference_blends(coordinates, gate):
    "float64 [blocks, 8, 8]: (1-g)I + g expm(A), A from an explicit loop over the row-major upper triangle."
    coordinates = np.asarray(coordinates, dtype=np.float64)
    gate = np.broadcast_to(np.asarray(gate, dtype=np.float64), len(coordinates))
    out = []
    for v, g in zip(coordinates, gate):
        A = np.zeros((8, 8))
        for k, (i, j) in enumerate(PAIRS):
            A[i, j], A[j, i] = v[k], -v[k]
        out.append((1 - g) * np.eye(8) + g * scipy.linalg.expm(A))
    return np.stack(out)


def dense(blends): return scipy.linalg.block_diag(*blends)
def as64(t): return t.detach().double().numpy()


def randomise(module, generator, std=0.5):
    "Fill a rotation module's coordinates with N(0, std²) draws."
    with torch.no_grad(): module.coordinates.normal_(std=std, generator=generator)
    return module


@pytest.fixture(scope="module")
def batch(): return sample_tasks(6)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return GridModel(TINY).eval()


# --- SO8Rotation -----------------------------------------------------------------------------------------------

@given(st.integers(1, 4), gates, seeds, st.sampled_from([(5,), (2, 3), (1, 2, 2)]))
def test_rotation_matches_dense_reference(blocks, gate, seed, lead):
    generator = torch.Generator().manual_seed(seed)
    rotation = randomise(SO8Rotation(8 * blocks, gate_init=1.0), generator, std=1.0)
    with torch.no_grad(): rotation.gate.fill_(gate)
    x = torch.randn(*lead, 8 * blocks, generator=generator)
    expected = as64(x) @ dense(reference_blends(as64(rotation.coordinates), as64(rotation.gate)))
    np.testing.assert_allclose(as64(rotation(x)), expected, atol=2e-5, rtol=0)


@given(st.integers(1, 6), st.floats(0.5, 1.0), seeds)
def test_rotation_is_identity_at_start(blocks, gate, seed):
    x = torch.randn(3, 4, 8 * blocks, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(SO8Rotation(8 * blocks, gate_init=gate)(x), x)


@pytest.mark.parametrize("d", [1, 7, 12, 0, -8, 20, 8.0, True])
def test_width_not_a_multiple_of_8_is_rejected(d):
    expected = "a positive multiple of 8" if type(d) is int and d > 0 else "a positive integer"
    for make in (SO8Rotation, LightweightSO8Adapter, lambda d: SO8VisualAdapter(4, d)):
        with pytest.raises(ValueError, match=re.escape(f"d must be {expected}, got {d!r}")):
            make(d)


def test_parameter_counts_are_28_per_block_per_set():
    for d in (8, 64, 4096):
        assert sum(p.numel() for p in SO8Rotation(d).parameters()) == 28 * d // 8 + d // 8
        assert sum(p.numel() for p in SO8Rotation(d, learn_gate=False).parameters()) == 28 * d // 8
        adapter = LightweightSO8Adapter(d, num_sets=3)
        assert adapter.coordinates.numel() == 3 * 28 * d // 8                    # the seed: 3·d² (16.7M per set at 4096)
        assert sum(p.numel() for p in adapter.parameters()) == 3 * 28 * d // 8 + 3 * (d + 1)
    assert 4096 * 4096 == 16_777_216 and 28 * 4096 // 8 == 14_336


def test_orthogonality_survives_10000_adam_steps():
    torch.manual_seed(0)
    rotation, x, target = SO8Rotation(16), torch.randn(32, 16), 3 * torch.randn(32, 16)
    optimizer = torch.optim.Adam(rotation.parameters(), lr=1e-2)
    for _ in range(10_000):
        optimizer.zero_grad()
        ((rotation(x) - target) ** 2).mean().backward()
        optimizer.step()
    R = rotation.rotations().detach()
    assert R.dtype == torch.float32
    assert torch.linalg.vector_norm(rotation.coordinates.detach(), dim=-1).max() > 1.0
    assert matrix_orthogonality_error(R).max().item() < 2e-5
    np.testing.assert_allclose(torch.linalg.det(R.double()).numpy(), 1.0, atol=1e-5)


def test_gradcheck_rotation_and_soft_selector():
    generator = torch.Generator().manual_seed(0)
    for module in (SO8Rotation(16), LightweightSO8Adapter(16, num_sets=2, temperature=0.7)):
        randomise(module, generator, std=0.7).double()
        if isinstance(module, SO8Rotation):
            with torch.no_grad(): module.gate.uniform_(0.1, 0.9, generator=generator)
        names = [n for n, _ in module.named_parameters()]
        leaves = [torch.randn(2, 3, 16, generator=generator, dtype=torch.float64).requires_grad_()]
        leaves += [p.detach().clone().requires_grad_() for p in module.parameters()]
        call = lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), (x,))
        assert torch.autograd.gradcheck(call, tuple(leaves))


# --- LightweightSO8Adapter ---------------------------------------------------------------------------------------

@given(st.sampled_from(["soft", "ste", "gumbel"]), st.integers(1, 4), st.booleans(), seeds)
def test_lightweight_is_identity_at_start(mode, num_sets, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*((3, 5) if tokens else (3,)), 16, generator=generator)
    adapter = LightweightSO8Adapter(16, num_sets, mode, generator=generator)
    assert torch.equal(adapter.train()(x), x) and torch.equal(adapter.eval()(x), x)


@given(st.integers(1, 4), st.floats(0.2, 3.0), seeds)
def test_soft_lightweight_matches_a_loop(num_sets, temperature, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    adapter = randomise(LightweightSO8Adapter(16, num_sets, "soft", temperature), generator)
    x = torch.randn(3, 4, 16, generator=generator)
    scores = as64(x).mean(1) @ as64(adapter.selector.weight).T + as64(adapter.selector.bias)
    weights = scipy.special.softmax(scores / temperature, axis=-1)
    sets = [dense(reference_blends(as64(adapter.coordinates[k]), 1.0)) for k in range(num_sets)]
    expected = np.stack([sum(weights[b, k] * as64(x[b]) @ sets[k] for k in range(num_sets)) for b in range(3)])
    np.testing.assert_allclose(as64(adapter(x)), expected, atol=2e-5, rtol=0)
    np.testing.assert_allclose(as64(adapter.last_weights), weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["ste", "gumbel"])
def test_hard_selectors_are_one_hot_and_send_gradient_to_the_selector(mode):
    generator = torch.Generator().manual_seed(1)
    adapter = randomise(LightweightSO8Adapter(16, 3, mode, generator=torch.Generator().manual_seed(2)), generator).train()
    x, target = torch.randn(8, 5, 16, generator=generator), torch.randn(8, 5, 16, generator=generator)
    y = adapter(x)
    ((y - target) ** 2).sum().backward()
    w = adapter.last_weights
    assert bool(((w == 0) | (w == 1)).all()) and bool((w.sum(-1) == 1).all())
    assert adapter.selector.weight.grad.abs().max() > 1e-3 and adapter.selector.bias.grad.abs().max() > 1e-3
    chosen = adapter.rotations().detach()[w.argmax(-1)]
    expected = np.stack([as64(x[b]) @ dense(as64(chosen[b])) for b in range(8)])
    np.testing.assert_allclose(as64(y), expected, atol=2e-5, rtol=0)


def test_gumbel_draws_follow_softmax_and_eval_is_deterministic():
    adapter = LightweightSO8Adapter(16, 3, "gumbel", generator=torch.Generator().manual_seed(3)).train()
    with torch.no_grad(): adapter.selector.bias.copy_(torch.tensor([0.0, 1.0, -0.5]))
    x = torch.zeros(30_000, 16)                          # scores = bias for every row
    with torch.no_grad():
        counts = adapter.selection_weights(x).sum(0).numpy()
        probabilities = scipy.special.softmax([0.0, 1.0, -0.5])
        assert scipy.stats.chisquare(counts, 30_000 * probabilities).pvalue > 1e-3
        adapter.eval()
        assert adapter.selection_weights(x[:5]).argmax(-1).tolist() == [1] * 5


def test_lightweight_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"): LightweightSO8Adapter(16, mode="hard")
    with pytest.raises(ValueError, match="num_sets must be a positive integer"): LightweightSO8Adapter(16, num_sets=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number in \(0, inf\)"): LightweightSO8Adapter(16, temperature=float("inf"))
    with pytest.raises(ValueError, match=r"x must have shape \[B, d\] or \[B, T, d\] with d = 16"): LightweightSO8Adapter(16)(torch.zeros(16))
    with pytest.raises(TypeError, match="x must be a floating-point"): LightweightSO8Adapter(16)(torch.zeros(2, 16, dtype=torch.long))


# --- visual adapter, LoRA ------------------------------------------------------------------------------------------

def test_visual_adapter_matches_numpy_and_starts_without_rotation():
    torch.manual_seed(0)
    visual = SO8VisualAdapter(in_dim=10, d=24, hidden=20)
    x = torch.randn(2, 3, 10)
    assert torch.equal(visual(x), visual.norm(visual.projection(visual.features(x))))
    randomise(visual.rotation, torch.Generator().manual_seed(1))
    p = {k: as64(v) for k, v in visual.state_dict().items()}
    ln = lambda z, w, b: (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5) * w + b
    gelu = lambda z: 0.5 * z * (1 + scipy.special.erf(z / np.sqrt(2)))
    z = gelu(as64(x) @ p["features.0.weight"].T + p["features.0.bias"]) @ p["features.2.weight"].T + p["features.2.bias"]
    z = ln(z, p["features.3.weight"], p["features.3.bias"]) @ p["projection.weight"].T + p["projection.bias"]
    z = ln(z @ dense(reference_blends(p["rotation.coordinates"], p["rotation.gate"])), p["norm.weight"], p["norm.bias"])
    np.testing.assert_allclose(as64(visual(x)), z, atol=2e-5, rtol=0)


@given(st.integers(1, 5), st.one_of(st.none(), st.floats(0.5, 16)), seeds)
def test_lora_matches_formula_and_merges(r, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(9, 7)
    lora = LoRA(base, r, alpha)
    x = torch.randn(4, 9, generator=generator)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad(): lora.lora_B.normal_(generator=generator)
    scale = (r if alpha is None else alpha) / r
    W, b, A, B = (as64(t) for t in (base.weight, base.bias, lora.lora_A, lora.lora_B))
    np.testing.assert_allclose(as64(lora(x)), as64(x) @ W.T + b + scale * as64(x) @ A.T @ B.T, atol=1e-4, rtol=1e-5)
    original = base.weight.detach().clone()
    lora.merge()
    np.testing.assert_allclose(as64(base.weight), W + scale * B @ A, atol=1e-5, rtol=1e-6)
    lora.unmerge()
    assert (base.weight - original).abs().max() <= 2 * torch.finfo(torch.float32).eps * max(1.0, np.abs(W + scale * B @ A).max())


# --- folding rotations into linear layers --------------------------------------------------------------------------

@given(st.integers(1, 3), st.integers(1, 12), gates, st.booleans(), seeds)
def test_fold_is_the_layer_followed_by_the_rotation_and_unfold_inverts_it(blocks, fan_in, gate, with_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    linear = nn.Linear(fan_in, 8 * blocks, bias=with_bias)
    blend = torch.from_numpy(reference_blends(np.random.default_rng(seed).normal(size=(blocks, 28)), gate))
    W, b = fold_rotation(linear.weight, linear.bias, blend)
    M = dense(blend.numpy())
    np.testing.assert_allclose(as64(W), M.T @ as64(linear.weight), atol=1e-12)
    x = torch.randn(5, fan_in, generator=generator, dtype=torch.float64)
    expected = (as64(x) @ as64(linear.weight).T + (as64(linear.bias) if with_bias else 0)) @ M
    np.testing.assert_allclose(as64(F.linear(x, W, b)), expected, atol=1e-12)
    merged = [t.detach().float() if t is not None else None for t in (W, b)]
    W0, b0 = unfold_rotation(merged[0], merged[1], blend)
    condition = np.linalg.cond(blend.numpy()).max()
    tolerance = 4 * condition * torch.finfo(torch.float32).eps * max(1.0, float(linear.weight.detach().abs().max()))
    assert (W0 - linear.weight.double()).abs().max() <= tolerance
    if with_bias: assert (b0 - linear.bias.double()).abs().max() <= tolerance


def test_unmerge_of_a_pure_rotation_is_the_transpose():
    "g = 1: unfold must equal M·W' exactly as computed by a plain float64 product (no inverse)."
    torch.manual_seed(0)
    blend = torch.from_numpy(reference_blends(np.random.default_rng(0).normal(size=(2, 28)), 1.0))
    merged = torch.randn(16, 5)
    W, _ = unfold_rotation(merged, None, blend)
    by_transpose = torch.from_numpy(dense(blend.numpy()) @ as64(merged))
    assert (W - by_transpose).abs().max() < 1e-14


@pytest.mark.parametrize("gate", [1.0, 0.8, 0.3])
def test_adapted_linear_round_trip(gate):
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    layer = AdaptedLinear(nn.Linear(12, 24), randomise(SO8Rotation(24, gate_init=gate), generator, std=1.0))
    x = torch.randn(3, 5, 12, generator=generator)
    original = [p.detach().clone() for p in layer.base.parameters()]
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        merged = layer(x)
    assert (merged - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    assert layer._merge_state[1] is None
    layer.unmerge()
    for p, q in zip(layer.base.parameters(), original):
        assert (p - q).abs().max() <= 1e-6 * q.abs().max()


def test_ill_conditioned_blend_keeps_a_copy_and_unmerges_exactly():
    layer = AdaptedLinear(nn.Linear(6, 8), SO8Rotation(8, gate_init=0.5))
    with torch.no_grad():
        layer.adapter.coordinates.zero_()
        layer.adapter.coordinates[0, 0] = math.pi            # A[0, 1] = π: a half turn in the (0, 1) plane, M singular
    original = [p.detach().clone() for p in layer.base.parameters()]
    layer.merge()
    assert layer._merge_state[1] is not None
    with torch.no_grad(): layer.adapter.coordinates.normal_()  # changing the adapter while merged must not matter
    layer.unmerge()
    assert all(torch.equal(p, q) for p, q in zip(layer.base.parameters(), original))


# --- attaching to a GridModel -----------------------------------------------------------------------------------

OPTIONS = {"lora": dict(r=3), "so8": dict(gate_init=0.75), "lightweight_so8": dict(num_sets=3, mode="ste"),
           "oft": dict(block_size=4), "hra": dict(r=4), "road": dict(variant="road_2", group_size=4)}


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_attached_model_equals_base_model_exactly(model, batch, kind):
    with torch.no_grad():
        reference = model.forward_batch(batch)
        originals = (model.bottleneck_in, model.bottleneck_out)
        adapted = attach_adapters(model, kind, **OPTIONS[kind]).forward_batch(batch)
    for field in ("logits", "h", "h_cells", "z", "h_hat", "primitive_logits"):
        if kind == "hra":   # peft multiplies W by a product of paired reflections: the identity to float32 rounding
            expected = getattr(reference, field)
            assert (getattr(adapted, field) - expected).abs().max() <= 1e-6 * expected.abs().max(), field
        else: assert torch.equal(getattr(adapted, field), getattr(reference, field)), field
    detach_adapters(model)
    assert model.bottleneck_in is originals[0] and model.bottleneck_out is originals[1]


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_freeze_base_trains_only_adapters(model, batch, kind):
    torch.manual_seed(1)
    attach_adapters(model, kind, **OPTIONS[kind])
    trainable = freeze_base(model)
    trainable_ids = {id(p) for p in trainable}
    assert trainable_ids == {id(p) for p in adapter_parameters(model)}
    before = {n: t.clone() for n, t in model.named_parameters() if id(t) not in trainable_ids}
    adapters_before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model.forward_batch(batch).logits, batch.outputs.long()).backward()
        optimizer.step()
    parameters = dict(model.named_parameters())
    for name, value in before.items():
        assert parameters[name].grad is None and torch.equal(parameters[name], value), name
    assert all(p.grad is not None for p in trainable)
    assert any(not torch.equal(p, q) for p, q in zip(trainable, adapters_before))
    assert not model.training and not model.bottleneck_in.base.training and model.bottleneck_in.training


@pytest.mark.parametrize("kind, options, gate", [("lora", dict(r=4), None), ("so8", {}, 1.0), ("so8", {}, 0.6),
                                                 ("lightweight_so8", dict(num_sets=1, mode="gumbel"), None)])
def test_merged_model_equals_adapted_model_and_unmerge_restores_weights(model, batch, kind, options, gate):
    torch.manual_seed(2)
    attach_adapters(model, kind, **options)
    for wrapper in adapted_layers(model).values():
        with torch.no_grad():
            for p in wrapper.adapter_parameters(): p.add_(0.3 * torch.randn(p.shape))
            if gate is not None: wrapper.adapter.gate.fill_(gate)
    model.eval()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        adapted = model.forward_batch(batch).logits
        merged = merge_adapters(model).forward_batch(batch).logits
        assert all(w.merged for w in adapted_layers(model).values())
        assert (merged - adapted).abs().max() <= 1e-5 * adapted.abs().max()
        unmerge_adapters(model)
    for name, value in state.items():
        assert (model.state_dict()[name] - value).abs().max() <= 1e-6 * value.abs().max().clamp_min(1e-30), name
    detach_adapters(model)


def test_detach_unmerges_first(model, batch):
    originals = {n: t.clone() for n, t in model.state_dict().items()}
    attach_adapters(model, "so8")
    for wrapper in adapted_layers(model).values(): randomise(wrapper.adapter, torch.Generator().manual_seed(0))
    merge_adapters(model)
    detach_adapters(model)
    assert type(model.bottleneck_in) is nn.Linear and type(model.bottleneck_out) is nn.Linear
    for name, value in originals.items():
        assert (model.state_dict()[name] - value).abs().max() <= 1e-6 * value.abs().max().clamp_min(1e-30)


def test_clear_errors(model):
    with pytest.raises(ValueError, match="kind must be one of"): attach_adapters(model, "dora")
    with pytest.raises(ValueError, match="where: model has no submodule 'nope'"): attach_adapters(model, "lora", where="nope")
    with pytest.raises(ValueError, match="is a LayerNorm, not an nn.Linear"): attach_adapters(model, "lora", where="encoder_norm")
    with pytest.raises(ValueError, match="where must name at least one"): attach_adapters(model, "lora", where=())
    with pytest.raises(ValueError, match=r"options \['num_sets'\] are not accepted by kind='lora'"): attach_adapters(model, "lora", num_sets=2)
    with pytest.raises(ValueError, match="'primitive_head'.*d must be a positive multiple of 8, got 6"):
        attach_adapters(model, "so8", where=("bottleneck_in", "primitive_head"))
    assert type(model.bottleneck_in) is nn.Linear                    # a failed attach changes nothing
    with pytest.raises(ValueError, match="model has no adapters"): freeze_base(model)
    with pytest.raises(ValueError, match="model has no adapters"): merge_adapters(model)
    attach_adapters(model, "lightweight_so8", num_sets=2)
    with pytest.raises(ValueError, match="cannot be merged"): merge_adapters(model)
    assert not any(w.merged for w in adapted_layers(model).values())
    with pytest.raises(ValueError, match="already has an adapter"): attach_adapters(model, "so8")
    with pytest.raises(RuntimeError, match="is not merged"): model.bottleneck_in.unmerge()
    with pytest.raises(ValueError, match=r"gate_init must be a finite number in \(0, 1\], got 0"): SO8Rotation(8, gate_init=0)
    with pytest.raises(TypeError, match="base must be an nn.Linear"): LoRA(nn.Identity(), 2)


# --- peft's peers: OFT, HRA, RoAd ---------------------------------------------------------------------------------

PEFT_PARAMETERS = {"oft": ["tuner.oft_R.default.weight"], "hra": ["tuner.hra_u.default"],
                   "road": ["tuner.road_theta.default", "tuner.road_alpha.default"]}


def peft_layer(kind, in_features=16, out_features=24, **options):
    torch.manual_seed(0)
    return PeftLinear(nn.Linear(in_features, out_features), kind, **options)


def redraw(parameters, std, seed=0, shift=False):
    "Set (or with `shift`, move) every tensor by N(0, std²) draws."
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            draw = std * torch.randn(p.shape, generator=generator)
            p.add_(draw) if shift else p.copy_(draw)


def skew(vector, n):
    "n×n skew matrix from the row-major upper triangle, by an explicit loop."
    Q = np.zeros((n, n))
    for k, (i, j) in enumerate(itertools.combinations(range(n), 2)):
        Q[i, j], Q[j, i] = vector[k], -vector[k]
    return Q


def reference_oft_blocks(weight, block_size, neumann):
    "float64 [blocks, b, b]: peft's 5-term Cayley–Neumann series I + 2Q + 2Q² + 2Q³ + Q⁴, or exact (I − Q)(I + Q)⁻¹."
    I, out = np.eye(block_size), []
    for v in np.asarray(weight, dtype=np.float64):
        Q = skew(v, block_size)
        out.append(I + 2 * Q + 2 * Q @ Q + 2 * Q @ Q @ Q + Q @ Q @ Q @ Q if neumann else (I - Q) @ np.linalg.inv(I + Q))
    return np.stack(out)


def reference_householder(u):
    "float64 H = H(u_1)···H(u_r), H(u) = I − 2uuᵀ/‖u‖², columns u_i of `u` [n, r]."
    H = np.eye(len(u))
    for i in range(u.shape[1]):
        v = u[:, i:i + 1]
        H = H @ (np.eye(len(u)) - 2 * v @ v.T / (v.T @ v))
    return H


def reference_road(y, theta, alpha, variant, group_size):
    "float64 RoAd on outputs y [..., n]: in each group, y_j and y_{j+g/2} turned by α·R(θ) (one (θ, α) per pair in road_1)."
    n, half = y.shape[-1], group_size // 2
    if variant == "road_1":
        theta, alpha = (np.repeat(t.reshape(-1, 1, half), 2, axis=1).reshape(n) for t in (theta, alpha))
    out = np.empty_like(y)
    for start in range(0, n, group_size):
        for j in range(half):
            a, b = start + j, start + half + j
            out[..., a] = alpha[a] * (np.cos(theta[a]) * y[..., a] - np.sin(theta[a]) * y[..., b])
            out[..., b] = alpha[b] * (np.sin(theta[b]) * y[..., a] + np.cos(theta[b]) * y[..., b])
    return out


@pytest.mark.parametrize("kind, options", [("oft", {}), ("oft", dict(block_size=4, use_cayley_neumann=False)),
                                           ("hra", dict(r=2)), ("hra", {}), ("road", {}),
                                           ("road", dict(variant="road_4", group_size=24))])
def test_peft_peers_start_as_the_identity(kind, options):
    layer = peft_layer(kind, **options)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): y, expected = layer(x), layer.base(x)
    if kind == "hra": assert (y - expected).abs().max() <= 1e-6   # paired reflections: I to float32 rounding
    else: assert torch.equal(y, expected)


@pytest.mark.parametrize("kind, options, per_layer", [
    ("oft", dict(block_size=2), lambda i, o: (i // 2) * 1),          # (in/b) blocks of b(b−1)/2 skew coordinates
    ("oft", dict(block_size=8), lambda i, o: (i // 8) * 28),
    ("oft", dict(block_size=16), lambda i, o: (i // 16) * 120),
    ("hra", dict(r=2), lambda i, o: 2 * i), ("hra", dict(r=6), lambda i, o: 6 * i),     # r vectors of width in
    ("road", dict(variant="road_1"), lambda i, o: o),                                    # θ and α per output pair
    ("road", dict(variant="road_2", group_size=16), lambda i, o: 2 * o),
    ("road", dict(variant="road_4", group_size=2), lambda i, o: 4 * o)])
def test_freeze_base_leaves_exactly_the_peft_parameters_trainable(model, kind, options, per_layer):
    originals = (model.bottleneck_in, model.bottleneck_out)
    attach_adapters(model, kind, **options)
    trainable = freeze_base(model)
    assert count_parameters(model) == per_layer(32, 16) + per_layer(16, 32)   # bottleneck_in 32 → 16, bottleneck_out 16 → 32
    for wrapper in adapted_layers(model).values():                               # per layer: input side vs output side
        assert sum(p.numel() for p in wrapper.adapter_parameters()) == per_layer(wrapper.base.in_features, wrapper.base.out_features)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [f"{layer}.{suffix}" for layer in ("bottleneck_in", "bottleneck_out") for suffix in PEFT_PARAMETERS[kind]]
    assert [id(p) for p in trainable] == [id(p) for p in model.parameters() if p.requires_grad]
    for wrapper, original in zip(adapted_layers(model).values(), originals):
        assert wrapper.base is original and wrapper.tuner.base_layer is original
        assert wrapper.training and wrapper.tuner.training and not original.training
        assert not any(p.requires_grad for p in original.parameters())
    assert len(adapter_parameters(model)) == 2 * len(PEFT_PARAMETERS[kind])


@pytest.mark.parametrize("kind, options", [("oft", {}), ("oft", dict(use_cayley_neumann=False)), ("hra", dict(r=4)),
                                           ("road", {}), ("road", dict(variant="road_4", group_size=16))])
def test_peft_merge_keeps_the_output_and_unmerge_restores_the_weights(model, batch, kind, options):
    originals = (model.bottleneck_in, model.bottleneck_out)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    attach_adapters(model, kind, **options)
    redraw(adapter_parameters(model), 0.3, shift=True)
    with torch.no_grad():
        adapted = model.forward_batch(batch).logits
        merged = merge_adapters(model).forward_batch(batch).logits
    assert all(w.merged and w.tuner.merged for w in adapted_layers(model).values())
    moved = max((originals[i].weight - state[f"{name}.weight"]).abs().max().item() for i, name in enumerate(("bottleneck_in", "bottleneck_out")))
    assert moved > 1e-2
    assert (merged - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    unmerge_adapters(model)
    assert not any(w.merged or w.tuner.merged for w in adapted_layers(model).values())
    detach_adapters(model)
    assert model.bottleneck_in is originals[0] and model.bottleneck_out is originals[1]
    for name, value in state.items():
        assert (model.state_dict()[name] - value).abs().max() <= 1e-5 * value.abs().max().clamp_min(1e-30), name


def test_detach_of_a_merged_peft_model_unmerges_first(model):
    originals = (model.bottleneck_in, model.bottleneck_out)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    attach_adapters(model, "hra", r=4)
    redraw(adapter_parameters(model), 0.5)
    merge_adapters(model)
    detach_adapters(model)
    assert model.bottleneck_in is originals[0] and model.bottleneck_out is originals[1]
    for name, value in state.items():
        assert (model.state_dict()[name] - value).abs().max() <= 1e-5 * value.abs().max().clamp_min(1e-30), name


@pytest.mark.parametrize("kind, options", [("so8", {}), ("so8", dict(gate_init=0.5)), ("lightweight_so8", dict(num_sets=3)),
                                           ("oft", dict(use_cayley_neumann=False)), ("hra", dict(r=4))])
@pytest.mark.parametrize("std", [0.1, 0.5])
def test_exact_maps_are_orthogonal_to_float_rounding(model, kind, options, std):
    attach_adapters(model, kind, **options)
    redraw(adapter_parameters(model), std)                          # gates too: the rotation part ignores them
    errors = orthogonality_error(model)
    assert sorted(errors) == ["bottleneck_in", "bottleneck_out"]
    assert max(errors.values()) < 1e-5
    for wrapper in adapted_layers(model).values():   # the error is of the matrices applied: compare with a reference
        M = as64(orthogonal_matrices(wrapper))
        if kind in ("so8", "lightweight_so8"):
            expected = reference_blends(as64(wrapper.adapter.coordinates).reshape(-1, 28), 1.0)
        elif kind == "oft":
            expected = dense(reference_oft_blocks(as64(wrapper.tuner.oft_R["default"].weight), 8, neumann=False))[None]
        else: expected = reference_householder(as64(wrapper.tuner.hra_u["default"])).T[None]
        np.testing.assert_allclose(M, expected, atol=1e-5)


def test_cayley_neumann_is_visibly_not_orthogonal(model):
    attach_adapters(model, "oft")                                   # peft's default: use_cayley_neumann=True
    redraw(adapter_parameters(model), 0.3)
    errors = orthogonality_error(model)
    for name, wrapper in adapted_layers(model).items():
        R = reference_oft_blocks(as64(wrapper.tuner.oft_R["default"].weight), 8, neumann=True)
        expected = np.abs(np.swapaxes(R, -1, -2) @ R - np.eye(8)).max()
        assert errors[name] > 1e-2
        assert errors[name] == pytest.approx(expected, rel=1e-4)


def test_additive_and_scaled_adapters_report_no_orthogonality(model):
    attach_adapters(model, "lora")
    assert orthogonality_error(model) == {} and orthogonal_matrices(model.bottleneck_in) is None
    detach_adapters(model)
    attach_adapters(model, "road")
    assert orthogonality_error(model) == {}
    detach_adapters(model)
    assert orthogonality_error(model) == {}                          # no adapters (fewshot's 'full'): nothing to report


@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_oft_is_an_independent_cayley_map_before_the_layer(neumann, block_size):
    layer = peft_layer("oft", block_size=block_size, use_cayley_neumann=neumann)
    redraw(layer.adapter_parameters(), 0.1)
    R = dense(reference_oft_blocks(as64(layer.tuner.oft_R["default"].weight), block_size, neumann))
    np.testing.assert_allclose(as64(orthogonal_matrices(layer)[0]), R, atol=1e-5)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2))
    W, b = as64(layer.base.weight), as64(layer.base.bias)
    np.testing.assert_allclose(as64(layer(x)), as64(x) @ R @ W.T + b, atol=1e-5)
    with torch.no_grad(): applied = layer.base(x @ torch.block_diag(*orthogonal_matrices(layer)))
    np.testing.assert_allclose(as64(layer(x)), as64(applied), atol=1e-5)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_hra_is_an_independent_reflection_product_before_the_layer(r):
    layer = peft_layer("hra", r=r)
    redraw(layer.adapter_parameters(), 0.5)
    H = reference_householder(as64(layer.tuner.hra_u["default"]))
    np.testing.assert_allclose(as64(orthogonal_matrices(layer)[0]), H.T, atol=1e-5)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2))
    W, b = as64(layer.base.weight), as64(layer.base.bias)
    np.testing.assert_allclose(as64(layer(x)), as64(x) @ H.T @ W.T + b, atol=1e-5)


@pytest.mark.parametrize("variant, group_size", [("road_1", 8), ("road_1", 24), ("road_2", 4)])
def test_road_turns_output_pairs_by_scaled_rotations(variant, group_size):
    layer = peft_layer("road", variant=variant, group_size=group_size)
    redraw(layer.adapter_parameters(), 0.7, shift=True)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2))
    theta, alpha = as64(layer.tuner.road_theta["default"]), as64(layer.tuner.road_alpha["default"])
    expected = reference_road(as64(layer.base(x)), theta, alpha, variant, group_size)
    np.testing.assert_allclose(as64(layer(x)), expected, atol=1e-5)


def test_peft_clear_errors(model):
    originals = (model.bottleneck_in, model.bottleneck_out)
    with pytest.raises(ValueError, match=r"options \['r'\] are not accepted by kind='oft' \(accepted: \['block_size', 'use_cayley_neumann'\]\)"):
        attach_adapters(model, "oft", r=3)
    with pytest.raises(ValueError, match=r"'bottleneck_in' \(in_features=32, out_features=16\): block_size must divide in_features=32, got 12"):
        attach_adapters(model, "oft", block_size=12)
    with pytest.raises(ValueError, match=r"'bottleneck_out' .*block_size must divide in_features=16, got 32"):
        attach_adapters(model, "oft", block_size=32)                 # fits bottleneck_in; nothing is attached
    with pytest.raises(ValueError, match="block_size must be an integer"): attach_adapters(model, "oft", block_size=1)
    with pytest.raises(ValueError, match=r"use_cayley_neumann must be one of \[True, False\], got 'yes'"):
        attach_adapters(model, "oft", use_cayley_neumann="yes")
    with pytest.raises(ValueError, match="r must be an even integer"): attach_adapters(model, "hra", r=3)
    with pytest.raises(ValueError, match="r must be an integer"): attach_adapters(model, "hra", r=0)
    with pytest.raises(ValueError, match=r"options \['apply_GS'\] are not accepted by kind='hra'"): attach_adapters(model, "hra", apply_GS=True)
    with pytest.raises(ValueError, match="group_size must be even and divide out_features=16, got 32"): attach_adapters(model, "road", group_size=32)
    with pytest.raises(ValueError, match="group_size must be even and divide out_features=16, got 6"): attach_adapters(model, "road", group_size=6)
    with pytest.raises(ValueError, match=r"variant must be one of \['road_1', 'road_2', 'road_4'\], got 'road_3'"):
        attach_adapters(model, "road", variant="road_3")
    with pytest.raises(ValueError, match="kind must be one of"): PeftLinear(nn.Linear(8, 8), "lora")
    with pytest.raises(TypeError, match="base must be an nn.Linear"): PeftLinear(nn.Conv1d(8, 8, 1), "oft")
    assert adapted_layers(model) == {} and (model.bottleneck_in, model.bottleneck_out) == originals


def test_peft_kinds_need_peft_and_the_core_does_not(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "peft", None)                   # as if peft were not installed
    with pytest.raises(ImportError, match=re.escape("kind='hra' needs peft: pip install peft")): attach_adapters(model, "hra")
    assert adapted_layers(model) == {}
    code = "import sys; sys.modules['peft'] = None; import so8lab.adapters as a; print(a.ADAPTER_KINDS, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "('lora', 'so8', 'lightweight_so8', 'oft', 'hra', 'road') False"


def test_peft_peers_are_silent(model, batch):
    "No warnings from peft while attaching, training, merging, unmerging and detaching."
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in PEFT_KINDS:
            attach_adapters(model, kind, **OPTIONS[kind])
            F.cross_entropy(model.forward_batch(batch).logits, batch.outputs.long()).backward()
            merge_adapters(model); unmerge_adapters(model); detach_adapters(model)


def test_deepcopy_of_a_peft_model_is_independent(model, batch):
    import copy
    attach_adapters(model, "oft")
    twin = copy.deepcopy(model)
    assert twin.bottleneck_in.base is twin.bottleneck_in.tuner.base_layer and twin.bottleneck_in.base is not model.bottleneck_in.base
    with torch.no_grad(): before = model.forward_batch(batch).logits
    redraw(adapter_parameters(twin), 0.3)
    with torch.no_grad(): assert torch.equal(model.forward_batch(batch).logits, before)


def test_parameter_table_widths_are_the_presets_and_counts_match_hand_formulas():
    from so8lab.experiments import run_configs
    cpu = ModelConfig(d_model=64, bottleneck_dim=64, layers=2, heads=4, sae_width=256, patch_size=2)
    assert run_configs("proposed", "cpu")[0] == cpu and run_configs("proposed", "plan")[0] == ModelConfig()
    torch.manual_seed(0)
    grid_model, d = GridModel(cpu), 64
    expected = {("lora", 1): 2 * (d + d), ("so8", True): 2 * 29 * d // 8, ("so8", False): 2 * 28 * d // 8,
                ("oft", 8): 2 * (d // 8) * 28, ("hra", 8): 2 * 8 * d, ("road", "road_1"): 2 * d}
    options = {"lora": "r", "so8": "learn_gate", "oft": "block_size", "hra": "r", "road": "variant"}
    for (kind, value), count in expected.items():
        attach_adapters(grid_model, kind, **{options[kind]: value})
        freeze_base(grid_model)
        assert count_parameters(grid_model) == count, (kind, value)
        detach_adapters(grid_model)
