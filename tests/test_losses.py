"""Tests of so8lab.losses against independent references (numpy float64 formulas, brute-force loops over cells and
groups, finite differences, hand-worked grids) and property tests with hypothesis. They pin SPEC §12 items 2-5:
the share loss has a gradient and aligns subspaces, rank-deficient and tiny groups neither crash nor give NaN,
the IoU loss is differentiable and the IoU metric is a per-colour mean, and the primitive head has 6 outputs."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import so8lab.losses as losses
from so8lab.losses import (DEFAULT_WEIGHTS, DeadUnitTracker, EMAProjector, LossManager, SAECoefficientController,
                           Schedule, TopKProjector, cell_accuracy, changed_cell_accuracy, exact_match, mean_iou, primitive_loss, sae_loss,
                           sae_statistics, share_loss, soft_iou_loss, task_loss, topk_projector)

seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- references
def share_reference(h, groups, k, min_group_size=None):
    "Share loss by a loop over groups with numpy float64 eigh; 0.0 with fewer than two usable groups."
    min_group_size = k + 1 if min_group_size is None else min_group_size
    projectors = []
    for label in sorted(set(groups.tolist())):
        rows = h[groups == label]
        if len(rows) < min_group_size: continue
        vectors = np.linalg.eigh(np.cov(rows, rowvar=False))[1][:, ::-1][:, :k]
        projectors.append(vectors @ vectors.T)
    if len(projectors) < 2: return 0.0
    mean = sum(projectors) / len(projectors)
    return sum(((p - mean) ** 2).sum() for p in projectors) / len(projectors)


def iou_reference(prediction, target):
    "Per-colour mean IoU of one grid with Python sets of cell coordinates."
    cells = [(r, c) for r in range(len(target)) for c in range(len(target[0]))]
    colours = {target[r][c] for r, c in cells} | {prediction[r][c] for r, c in cells}
    values = []
    for colour in colours:
        p = {cell for cell in cells if prediction[cell[0]][cell[1]] == colour}
        t = {cell for cell in cells if target[cell[0]][cell[1]] == colour}
        values.append(len(p & t) / len(p | t))
    return sum(values) / len(values)


def soft_iou_reference(probabilities, target):
    "1 - soft IoU of one sample by explicit loops: probabilities [C][cells], target [cells]."
    colours = sorted(set(target))
    values = []
    for c in colours:
        intersection = sum(p for p, t in zip(probabilities[c], target) if t == c)
        union = sum(p + (t == c) - p * (t == c) for p, t in zip(probabilities[c], target))
        values.append(intersection / union)
    return sum(values) / len(values)


def principal_sines(a, b, k):
    "Sines of the principal angles between the top-k PCA subspaces of row sets a and b (numpy)."
    bases = [np.linalg.eigh(np.cov(x, rowvar=False))[1][:, -k:] for x in (a, b)]
    cosines = np.clip(np.linalg.svd(bases[0].T @ bases[1], compute_uv=False), 0, 1)
    return np.sqrt(1 - cosines ** 2)


def random_groups(seed, sizes, dimension, dtype=torch.float64):
    "Rows of h for groups of the given sizes, each with its own random covariance; group ids 0..len(sizes)-1."
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(n, dimension, generator=generator, dtype=dtype)
              @ torch.randn(dimension, dimension, generator=generator, dtype=dtype) for n in sizes]
    groups = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return torch.cat(blocks), groups


# ---------------------------------------------------------------- TopKProjector
@settings(max_examples=40)
@given(seed=seeds, dimension=st.integers(2, 10), data=st.data())
def test_projector_is_symmetric_idempotent_with_trace_k(seed, dimension, data):
    k = data.draw(st.integers(1, dimension - 1))
    rank = data.draw(st.integers(0, dimension))                      # rank-deficient (even zero) matrices included
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dimension, rank, generator=generator, dtype=torch.float64)
    projector = topk_projector(factor @ factor.T, k)
    np.testing.assert_allclose(projector, projector.T, atol=1e-12)
    np.testing.assert_allclose(projector @ projector, projector, atol=1e-10)
    assert abs(projector.trace().item() - k) < 1e-10
    eigenvalues = np.linalg.eigvalsh(projector.numpy())
    np.testing.assert_allclose(np.sort(eigenvalues), [0] * (dimension - k) + [1] * k, atol=1e-10)


@settings(max_examples=15)
@given(seed=seeds, dimension=st.integers(3, 7), data=st.data())
def test_projector_gradient_matches_finite_differences_on_separated_spectra(seed, dimension, data):
    k = data.draw(st.integers(1, dimension - 1))
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((dimension, dimension)))[0]
    eigenvalues = np.arange(dimension, 0, -1) + rng.uniform(0, 0.3, dimension)   # gaps >= 0.7
    covariance = torch.tensor(q @ np.diag(eigenvalues) @ q.T, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: topk_projector(c, k), (covariance,))


@settings(max_examples=25)
@given(seed=seeds, dimension=st.integers(3, 9), data=st.data())
def test_projector_gradient_matches_eigh_autograd_on_distinct_spectra(seed, dimension, data):
    k = data.draw(st.integers(1, dimension - 1))
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dimension, dimension, generator=generator, dtype=torch.float64)
    covariance = (factor @ factor.T + 0.1 * torch.eye(dimension, dtype=torch.float64)).requires_grad_()
    eigenvalues = torch.linalg.eigvalsh(covariance.detach()).flip(0)
    assume(eigenvalues[k - 1] - eigenvalues[k] > 1e-2 * eigenvalues[0])    # the gap clamp must be inactive here
    weights = torch.randn(dimension, dimension, generator=generator, dtype=torch.float64)
    vectors = torch.linalg.eigh(covariance)[1][:, -k:]
    expected = torch.autograd.grad(((vectors @ vectors.T) * weights).sum(), covariance)[0]
    actual = torch.autograd.grad((topk_projector(covariance, k) * weights).sum(), covariance)[0]
    np.testing.assert_allclose(actual, expected, atol=1e-8)


@pytest.mark.parametrize("matrix", ["zero", "degenerate", "rank_one", "equal_gap"])
def test_projector_backward_is_finite_where_eigh_is_not(matrix):
    dimension, k = 8, 4
    matrix = {"zero": torch.zeros(dimension, dimension, dtype=torch.float64),
              "degenerate": torch.diag(torch.tensor([3.0, 2, 1, 1, 0, 0, 0, 0], dtype=torch.float64)),
              "rank_one": torch.ones(dimension, dimension, dtype=torch.float64),
              "equal_gap": torch.diag(torch.tensor([4.0, 3, 2, 1, 1, 1, 0.5, 0], dtype=torch.float64))}[matrix]
    matrix = matrix.requires_grad_()
    target = torch.randn(dimension, dimension, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = ((topk_projector(matrix, k) - (target + target.T)) ** 2).sum()
    gradient = torch.autograd.grad(loss, matrix)[0]
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()


def test_projector_input_errors():
    with pytest.raises(ValueError, match="k must be an integer in 1..3"): topk_projector(torch.eye(4), 4)
    with pytest.raises(ValueError, match="covariance must be"): topk_projector(torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="gap_floor must be > 0"): topk_projector(torch.eye(4), 1, gap_floor=0.0)
    assert TopKProjector.apply(torch.eye(3), 1, 1e-4).shape == (3, 3)


# ---------------------------------------------------------------- share loss: values and properties
@settings(max_examples=30)
@given(seed=seeds, sizes=st.lists(st.integers(1, 14), min_size=1, max_size=4), dimension=st.integers(3, 8), data=st.data())
def test_share_loss_matches_numpy_loop(seed, sizes, dimension, data):
    k = data.draw(st.integers(1, dimension - 1))
    h, groups = random_groups(seed, sizes, dimension)
    loss, info = share_loss(h, groups, k=k)
    expected = share_reference(h.numpy(), groups.numpy(), k)
    usable = sum(n >= k + 1 for n in sizes)
    assert (info["groups_used"], info["groups_too_small"], info["groups_total"]) == (usable, len(sizes) - usable, len(sizes))
    assert info["samples_skipped"] == sum(n for n in sizes if n < k + 1)
    assert abs(loss.item() - expected) < 1e-8 * max(1.0, expected)
    assert loss.item() >= 0


@settings(max_examples=30)
@given(seed=seeds, sizes=st.lists(st.integers(5, 12), min_size=2, max_size=4), data=st.data())
def test_share_loss_invariances(seed, sizes, data):
    "Invariant to permuting samples, relabelling groups, and rotating, scaling and translating h."
    dimension, k = 6, 3
    h, groups = random_groups(seed, sizes, dimension)
    loss = share_loss(h, groups, k=k)[0].item()
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(len(h)))
    labels = torch.as_tensor(rng.choice(1000, size=len(sizes), replace=False) - 500)   # new ids, new order
    rotation = torch.as_tensor(np.linalg.qr(rng.standard_normal((dimension, dimension)))[0])
    shift = torch.as_tensor(rng.standard_normal(dimension))
    scale = data.draw(st.floats(0.01, 100))
    variants = {"permuted": (h[order], groups[order]), "relabelled": (h, labels[groups]),
                "rotated": (h @ rotation, groups), "scaled and shifted": (scale * h + shift, groups)}
    for name, (h_variant, groups_variant) in variants.items():
        assert abs(share_loss(h_variant, groups_variant, k=k)[0].item() - loss) < 1e-8, name


@settings(max_examples=20)
@given(seed=seeds, sizes=st.lists(st.integers(5, 10), min_size=2, max_size=3))
def test_share_loss_with_reference_is_mean_distance_to_it(seed, sizes):
    h, groups = random_groups(seed, sizes, 5)
    reference = torch.eye(5, dtype=torch.float64) * 0.4
    loss = share_loss(h, groups, k=2, reference=reference)[0].item()
    projectors = []
    for label in range(len(sizes)):
        vectors = np.linalg.eigh(np.cov(h[groups == label].numpy(), rowvar=False))[1][:, -2:]
        projectors.append(vectors @ vectors.T)
    assert abs(loss - np.mean([((p - reference.numpy()) ** 2).sum() for p in projectors])) < 1e-9


# ---------------------------------------------------------------- share loss: SPEC §12.2 (gradient, alignment)
def two_subspace_groups(seed, dimension=16, k=4, per_group=48, noise=0.05):
    "Fixed inputs near two different random k-dim subspaces (one per group)."
    generator = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(dimension, k, generator=generator))[0].T for _ in range(2)]
    inputs = torch.cat([torch.randn(per_group, k, generator=generator) @ basis for basis in bases])
    inputs = inputs + noise * torch.randn(2 * per_group, dimension, generator=generator)
    return inputs, torch.arange(2 * per_group) // per_group


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_loss_gradient_into_h_is_nonzero_and_matches_finite_differences(seed):
    inputs, groups = two_subspace_groups(seed, dimension=6, k=2, per_group=8)
    h = inputs.double().requires_grad_()
    loss, info = share_loss(h, groups, k=2)
    assert info["groups_used"] == 2 and loss.item() > 0.1
    gradient = torch.autograd.grad(loss, h)[0]
    assert gradient.abs().max() > 1e-3                               # the reference's detached basis gave exactly 0
    fixed = info["mean_projector"].double()                          # the detached mean, held fixed
    objective = lambda x: share_loss(x, groups, k=2, reference=fixed)[0]
    np.testing.assert_allclose(torch.autograd.grad(objective(h), h)[0], gradient, atol=1e-12)
    assert torch.autograd.gradcheck(objective, (h.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minimizing_share_loss_alone_aligns_group_subspaces(seed):
    dimension, k = 16, 4
    inputs, groups = two_subspace_groups(seed, dimension, k)
    linear = torch.nn.Linear(dimension, dimension, bias=False)
    torch.nn.init.eye_(linear.weight)
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.02)
    def sines(x): return principal_sines(x[groups == 0].numpy(), x[groups == 1].numpy(), k)
    before = sines(inputs)
    for _ in range(80):
        optimizer.zero_grad()
        loss, info = share_loss(linear(inputs), groups, k=k)
        loss.backward()
        optimizer.step()
    after = sines(linear(inputs).detach())
    assert before.max() > 0.9                                         # random subspaces start far apart
    distance_before, distance_after = np.sqrt(2 * (before ** 2).sum()), np.sqrt(2 * (after ** 2).sum())
    assert distance_after < 0.1 * distance_before, (distance_before, distance_after)
    assert after.max() < 0.2


# ---------------------------------------------------------------- share loss: SPEC §12.3 (degenerate groups)
DEGENERATE_GROUPS = {
    "all equal rows": lambda g: torch.randn(1, 8, generator=g).expand(20, 8),
    "rank 1": lambda g: torch.randn(20, 1, generator=g) @ torch.randn(1, 8, generator=g),
    "rank 3 < k": lambda g: torch.randn(20, 3, generator=g) @ torch.randn(3, 8, generator=g),
    "duplicated rows": lambda g: torch.randn(3, 8, generator=g).repeat(7, 1),
    "tiny (2 rows)": lambda g: torch.randn(2, 8, generator=g),
    "one row": lambda g: torch.randn(1, 8, generator=g),
    "zero": lambda g: torch.zeros(20, 8),
    "huge scale": lambda g: 1e6 * torch.randn(20, 8, generator=g),
    "tiny scale": lambda g: 1e-6 * torch.randn(20, 8, generator=g),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE_GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_groups_give_finite_loss_and_gradient(name, dtype):
    generator = torch.Generator().manual_seed(0)
    odd = DEGENERATE_GROUPS[name](generator)
    normal = [torch.randn(20, 8, generator=generator) for _ in range(2)]
    h = torch.cat([odd, *normal]).to(dtype).requires_grad_()
    groups = torch.cat([torch.full((len(odd),), 5), torch.full((20,), 9), torch.full((20,), 2)])
    loss, info = share_loss(h, groups, k=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert info["groups_used"] + info["groups_skipped"] == 3
    if len(odd) < 5: assert info["groups_too_small"] == 1 and info["samples_skipped"] == len(odd)
    if name in ("all equal rows", "zero"): assert info["groups_collapsed"] == 1


def test_tiny_groups_only_give_zero_loss_counted_and_explained():
    h, groups = random_groups(0, [3, 4, 2], 8)
    h = h.requires_grad_()
    loss, info = share_loss(h, groups, k=4)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert (info["groups_used"], info["groups_too_small"], info["samples_skipped"]) == (0, 3, 9)
    assert "0 usable group(s) < min_groups=2" in info["reason"] and "3 had < min_group_size=5" in info["reason"]
    assert info["mean_projector"] is None


def test_single_group_batch_gives_zero_loss_and_says_so():
    h = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, info = share_loss(h, torch.full((64,), 17), k=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()
    assert (info["groups_total"], info["groups_used"], info["groups_skipped"]) == (1, 1, 0)
    assert info["reason"].startswith("1 usable group(s) < min_groups=2")
    assert info["mean_projector"].shape == (8, 8)                    # still offered to an EMA reference


def test_min_group_size_and_min_groups_options():
    h, groups = random_groups(1, [4, 6, 30], 6)
    assert share_loss(h, groups, k=3)[1]["groups_used"] == 3          # default min_group_size = k + 1 = 4
    assert share_loss(h, groups, k=3, min_group_size=7)[1]["groups_used"] == 1
    loss, info = share_loss(h, groups, k=3, min_group_size=7, min_groups=1, reference=torch.eye(6, dtype=torch.float64) / 2)
    assert info["reason"] == "" and loss.item() > 0


def test_share_loss_input_errors():
    h = torch.randn(10, 4)
    with pytest.raises(TypeError, match="groups must be an integer tensor of shape \\[10\\]"): share_loss(h, torch.zeros(10), k=2)
    with pytest.raises(TypeError, match="groups must be an integer tensor"): share_loss(h, torch.zeros(9, dtype=torch.long), k=2)
    with pytest.raises(TypeError, match="h must be a float tensor"): share_loss(h.long(), torch.zeros(10, dtype=torch.long), k=2)
    with pytest.raises(ValueError, match="k must be an integer in 1..3"): share_loss(h, torch.zeros(10, dtype=torch.long), k=4)
    with pytest.raises(ValueError, match="min_group_size must be an integer >= 2"):
        share_loss(h, torch.zeros(10, dtype=torch.long), k=2, min_group_size=1)
    with pytest.raises(ValueError, match="reference must be a \\[4, 4\\] projector"):
        share_loss(h, torch.zeros(10, dtype=torch.long), k=2, reference=torch.eye(3))


# ---------------------------------------------------------------- EMA reference
@given(decay=st.floats(0, 0.99), every=st.integers(1, 4), steps=st.integers(1, 12), seed=seeds)
def test_ema_projector_matches_explicit_recursion(decay, every, steps, seed):
    rng = np.random.default_rng(seed)
    projectors = [torch.as_tensor(rng.standard_normal((3, 3))) for _ in range(steps)]
    ema, expected = EMAProjector(decay=decay, update_every=every), None
    for step, projector in enumerate(projectors):
        ema.update(projector)
        if step % every == 0:
            expected = projector.numpy() if expected is None else decay * expected + (1 - decay) * projector.numpy()
    np.testing.assert_allclose(ema.reference, expected, atol=1e-12)


# ---------------------------------------------------------------- task losses and metrics (SPEC §12.4)
@settings(max_examples=40)
@given(seed=seeds, batch=st.integers(1, 3), colours=st.integers(2, 5), side=st.integers(1, 4))
def test_soft_iou_matches_loop_reference_and_has_gradient(seed, batch, colours, side):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, colours, side, side, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, colours, (batch, side, side), generator=generator)
    loss = soft_iou_loss(logits, targets)
    probabilities = logits.detach().softmax(1).flatten(2).tolist()
    expected = 1 - np.mean([soft_iou_reference(probabilities[b], targets[b].flatten().tolist()) for b in range(batch)])
    assert abs(loss.item() - expected) < 1e-12 and 0 <= loss.item() <= 1
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_iou_gradient_matches_finite_differences_and_is_not_under_no_grad():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (2, 4, 4), generator=generator)
    assert soft_iou_loss(logits, targets).requires_grad
    assert torch.autograd.gradcheck(lambda x: task_loss(x, targets, kind="soft_iou"), (logits,))
    targets = torch.randint(0, 4, (3, 8, 8), generator=generator)
    # descending the soft IoU loss raises the hard IoU
    parameters = torch.zeros(3, 4, 8, 8, requires_grad=True)
    optimizer = torch.optim.SGD([parameters], lr=50.0)
    for _ in range(30):
        optimizer.zero_grad(); soft_iou_loss(parameters, targets).backward(); optimizer.step()
    assert mean_iou(parameters, targets).item() == 1.0


def test_soft_iou_of_confident_logits_is_hard_iou_over_target_colours():
    targets = torch.tensor([[[0, 0, 1, 1]]])
    predictions = torch.tensor([[[0, 1, 1, 2]]])
    logits = 100.0 * torch.nn.functional.one_hot(predictions, 3).movedim(-1, 1).double()
    # colour 0: |P∩T| = 1, |P∪T| = 2; colour 1: 1 / 3; colour 2 is absent from the target
    assert abs(soft_iou_loss(logits, targets).item() - (1 - (1 / 2 + 1 / 3) / 2)) < 1e-12


def test_cross_entropy_matches_formula_and_accepts_uint8_targets():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (2, 8, 8), generator=generator).to(torch.uint8)
    probabilities = logits.softmax(1).numpy()
    expected = -np.mean([np.log(probabilities[b, targets[b, r, c], r, c]) for b in range(2) for r in range(8) for c in range(8)])
    assert abs(task_loss(logits, targets).item() - expected) < 1e-12


def test_task_loss_input_errors():
    logits = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="kind must be one of"): task_loss(logits, torch.zeros(2, 8, 8, dtype=torch.long), kind="iou")
    with pytest.raises(ValueError, match="targets must be colours in 0..3"): task_loss(logits, torch.full((2, 8, 8), 4))
    with pytest.raises(ValueError, match="targets must have shape"): task_loss(logits, torch.zeros(2, 8, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a float tensor"): task_loss(logits[0], torch.zeros(2, 8, 8, dtype=torch.long))


def test_mean_iou_hand_worked_grid_is_not_accuracy_over_two_minus_accuracy():
    target = torch.zeros(8, 8, dtype=torch.long); target[6:] = 1
    prediction = torch.zeros(8, 8, dtype=torch.long); prediction[5] = 2; prediction[6] = 1
    # colour 0: 40 / 56 = 5/7; colour 1: 8 / 16 = 1/2; colour 2: 0 / 8; colour 3 absent -> (5/7 + 1/2 + 0) / 3 = 17/42
    assert abs(mean_iou(prediction[None], target[None], num_colors=4).item() - 17 / 42) < 1e-6
    accuracy = cell_accuracy(prediction[None], target[None]).item()
    assert accuracy == 0.75
    summed = accuracy / (2 - accuracy)                               # the reference's summed-over-classes IoU = 3/5
    assert abs(summed - 3 / 5) < 1e-12 and abs(mean_iou(prediction[None], target[None]).item() - summed) > 0.19


@settings(max_examples=60)
@given(seed=seeds, batch=st.integers(1, 4), colours=st.integers(1, 5), side=st.integers(1, 8))
def test_metrics_match_brute_force(seed, batch, colours, side):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, colours, (batch, side, side), generator=generator)
    flips = torch.rand(batch, side, side, generator=generator) < 0.3
    predictions = torch.where(flips, torch.randint(0, colours, (batch, side, side), generator=generator), targets)
    p, t = predictions.tolist(), targets.tolist()
    ious = [iou_reference(p[b], t[b]) for b in range(batch)]
    np.testing.assert_allclose(mean_iou(predictions, targets, per_sample=True), ious, atol=1e-6)
    assert abs(mean_iou(predictions, targets, num_colors=colours + 3).item() - np.mean(ious)) < 1e-6
    correct = [[p[b][r][c] == t[b][r][c] for r in range(side) for c in range(side)] for b in range(batch)]
    assert abs(cell_accuracy(predictions, targets).item() - np.mean([np.mean(x) for x in correct])) < 1e-6
    assert exact_match(predictions, targets, per_sample=True).tolist() == [float(all(x)) for x in correct]
    assert (mean_iou(predictions, targets, per_sample=True) == 1).tolist() == [all(x) for x in correct]


def test_metrics_accept_logits_and_need_no_grad():
    targets = torch.randint(0, 4, (3, 8, 8), generator=torch.Generator().manual_seed(2))
    logits = (5.0 * torch.nn.functional.one_hot(targets, 4).movedim(-1, 1).float()).requires_grad_()
    for metric in (cell_accuracy, exact_match, mean_iou):
        value = metric(logits, targets)
        assert value.item() == 1.0 and not value.requires_grad
    with pytest.raises(ValueError, match="predictions must have the shape of targets"): mean_iou(targets[:, :4], targets)



def changed_accuracy_reference(prediction, target, source):
    "Changed-cell accuracy of one grid by a loop over cells (lists of lists); None when the program changed no cell."
    changed = [(r, c) for r in range(len(target)) for c in range(len(target[0])) if target[r][c] != source[r][c]]
    if not changed: return None
    return sum(prediction[r][c] == target[r][c] for r, c in changed) / len(changed)


@settings(max_examples=80)
@given(seed=seeds, batch=st.integers(1, 5), colours=st.integers(1, 5), side=st.integers(1, 8), change=st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_changed_cell_accuracy_matches_brute_force(seed, batch, colours, side, change):
    generator = torch.Generator().manual_seed(seed)
    def noise(): return torch.randint(0, colours, (batch, side, side), generator=generator, dtype=torch.uint8)
    def mask(rate): return torch.rand(batch, side, side, generator=generator) < rate
    inputs = noise()
    targets = torch.where(mask(change), noise(), inputs)
    predictions = torch.where(mask(0.4), noise(), targets).long()
    p, t, x = predictions.tolist(), targets.tolist(), inputs.tolist()
    expected = [changed_accuracy_reference(p[b], t[b], x[b]) for b in range(batch)]
    logits = 3.0 * torch.nn.functional.one_hot(predictions, colours).movedim(-1, 1).float()
    for argument in (predictions, logits):
        values = changed_cell_accuracy(argument, targets, inputs, per_sample=True).tolist()
        assert [math.isnan(v) for v in values] == [e is None for e in expected]
        np.testing.assert_allclose([v for v in values if not math.isnan(v)], [e for e in expected if e is not None], atol=1e-6)
        defined, mean = [e for e in expected if e is not None], changed_cell_accuracy(argument, targets, inputs).item()
        assert math.isnan(mean) if not defined else abs(mean - np.mean(defined)) < 1e-6


def test_changed_cell_accuracy_of_copying_the_input_is_zero_and_errors_name_the_argument():
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 4, (6, 8, 8), generator=generator)
    targets = inputs.clone(); targets[:, 0] = (inputs[:, 0] + 1) % 4
    assert changed_cell_accuracy(inputs, targets, inputs).item() == 0.0
    assert changed_cell_accuracy(targets, targets, inputs).item() == 1.0
    with pytest.raises(ValueError, match="inputs must have the shape of targets"): changed_cell_accuracy(targets, targets, inputs[:, :4])
    with pytest.raises(ValueError, match="predictions must have the shape of targets"): changed_cell_accuracy(targets[:, :4], targets, inputs)


# ---------------------------------------------------------------- SAE
@settings(max_examples=30)
@given(seed=seeds, batch=st.integers(2, 6), dimension=st.integers(1, 5), width=st.integers(1, 8), coefficient=st.floats(0, 2))
def test_sae_loss_and_statistics_match_numpy(seed, batch, dimension, width, coefficient):
    rng = np.random.default_rng(seed)
    h, h_hat = rng.standard_normal((batch, dimension)) + 3.0, rng.standard_normal((batch, dimension))
    z = np.maximum(rng.standard_normal((batch, width)), 0)
    loss = sae_loss(*(torch.as_tensor(x) for x in (h, h_hat, z)), coefficient).item()
    expected = np.mean(np.sum((h - h_hat) ** 2, axis=1)) + coefficient * np.mean(np.sum(np.abs(z), axis=1))
    assert abs(loss - expected) < 1e-10 * max(1, expected)
    statistics = sae_statistics(*(torch.as_tensor(x) for x in (h, h_hat, z)))
    active = z > 0
    # explained variance = R² over all features jointly: residual sum of squares over the total sum of squares about
    # the per-feature batch mean (SAELens's corrected definition)
    residual = sum((h[b, d] - h_hat[b, d]) ** 2 for b in range(batch) for d in range(dimension))
    total = sum((h[b, d] - h[:, d].mean()) ** 2 for b in range(batch) for d in range(dimension))
    assert abs(statistics["explained_variance"] - (1 - residual / total)) < 1e-9
    assert abs(statistics["l0"] - active.sum() / batch) < 1e-12
    assert abs(statistics["activation_rate"] - active.mean()) < 1e-12
    assert statistics["dead_units"] == int((~active.any(axis=0)).sum())


def test_explained_variance_of_mean_prediction_is_zero_not_near_one():
    h = torch.randn(100, 4, generator=torch.Generator().manual_seed(0)) + 10.0   # large mean: about-zero variance would mislead
    statistics = sae_statistics(h, h.mean(0).expand_as(h), torch.ones(100, 3))
    assert abs(statistics["explained_variance"]) < 1e-9
    assert sae_statistics(h, h, torch.ones(100, 3))["explained_variance"] == 1.0


@given(seed=seeds, window=st.integers(1, 5), steps=st.integers(1, 12))
def test_dead_unit_tracker_matches_brute_force(seed, window, steps):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((3, 5)) * (rng.random(5) < 0.3) for _ in range(steps)]
    tracker = DeadUnitTracker(width=5, window=window)
    for z in batches: tracker.update(torch.as_tensor(z))
    recent = batches[-window:] if steps >= window else None
    expected = [False] * 5 if recent is None else [not any((z[:, u] != 0).any() for z in recent) for u in range(5)]
    assert tracker.dead.tolist() == expected


def test_coefficient_controller_warms_up_then_tracks_the_target_rate():
    controller = SAECoefficientController(target_rate=0.1, warmup_steps=10, initial_coefficient=0.01, gain=0.05)
    warmup = [controller.coefficient] + [controller.update(0.9) for _ in range(10)]   # no tuning during warm-up
    np.testing.assert_allclose(warmup, [0.001 * i for i in range(11)], atol=1e-15)
    controller.update(0.9)                                           # too dense: λ up by the capped factor e^0.05
    assert abs(controller.coefficient - 0.01 * math.exp(0.05)) < 1e-15
    controller.update(0.0)                                           # too sparse: λ down by e^-0.05
    assert abs(controller.coefficient - 0.01) < 1e-15
    # simulated SAE: rate(λ) = 0.8 exp(-λ / 0.02); the target 0.1 is reached at λ* = 0.02 ln 8
    for _ in range(1500): controller.update(0.8 * math.exp(-controller.coefficient / 0.02))
    assert abs(controller.coefficient - 0.02 * math.log(8)) < 1e-3 * 0.02 * math.log(8) * 10
    restored = SAECoefficientController(target_rate=0.1, warmup_steps=10)
    restored.load_state_dict(controller.state_dict())
    assert restored.coefficient == controller.coefficient


# ---------------------------------------------------------------- primitive loss (SPEC §12.5)
def test_primitive_loss_has_six_outputs_and_matches_formula():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (7, 6), generator=generator)
    x, y = logits.numpy(), labels.numpy()
    expected = np.mean(np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * y)   # stable BCE-with-logits
    assert abs(primitive_loss(logits, labels).item() - expected) < 1e-12
    with pytest.raises(ValueError, match="logits must be \\[B, 6\\]"): primitive_loss(torch.randn(7, 8), torch.zeros(7, 8))
    with pytest.raises(ValueError, match="multi_hot must have the shape of logits"): primitive_loss(logits, labels[:, :5])


# ---------------------------------------------------------------- schedules
def test_schedules_at_hand_computed_steps():
    assert [Schedule("constant", end=0.7)(t) for t in (0, 10**6)] == [0.7, 0.7]
    assert [Schedule("warmup", start=0.0, end=0.1, warmup_steps=100)(t) for t in (0, 50, 100, 200)] == [0.0, 0.05, 0.1, 0.1]
    linear = Schedule("linear", start=1.0, end=0.0, warmup_steps=20, total_steps=120)
    assert [linear(t) for t in (0, 20, 45, 70, 120, 121)] == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    cosine = Schedule("cosine", start=0.0, end=2.0, total_steps=90)
    # step 30: a third of the way, (1 - cos(π/3)) / 2 = 1/4 of 2 = 0.5; step 60: (1 - cos(2π/3)) / 2 = 3/4 -> 1.5
    np.testing.assert_allclose([cosine(t) for t in (0, 30, 45, 60, 90)], [0.0, 0.5, 1.0, 1.5, 2.0], atol=1e-12)


@given(kind=st.sampled_from(["constant", "warmup", "linear", "cosine"]), start=st.floats(-5, 5), end=st.floats(-5, 5),
       warmup=st.integers(1, 50), length=st.integers(1, 50), steps=st.lists(st.integers(0, 200), min_size=2, max_size=8))
def test_schedules_are_monotone_and_bounded(kind, start, end, warmup, length, steps):
    schedule = Schedule(kind, start=start, end=end, warmup_steps=warmup, total_steps=warmup + length)
    values = [schedule(t) for t in sorted(steps)]
    low, high = min(start, end) - 1e-12, max(start, end) + 1e-12
    assert all(low <= v <= high for v in values)
    direction = 1 if end >= start else -1
    assert all(direction * (b - a) >= -1e-12 for a, b in zip(values, values[1:]))
    assert abs(schedule(10**6) - end) < 1e-12


# ---------------------------------------------------------------- LossManager
def manager_outputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(logits=torch.randn(24, 4, 8, 8, generator=generator, requires_grad=True),
                targets=torch.randint(0, 4, (24, 8, 8), generator=generator),
                h=torch.randn(24, 6, generator=generator, requires_grad=True), groups=torch.arange(24) % 3,
                z=torch.randn(24, 10, generator=generator).relu(), h_hat=torch.randn(24, 6, generator=generator),
                primitive_logits=torch.randn(24, 6, generator=generator), multi_hot=torch.randint(0, 2, (24, 6), generator=generator))


def test_loss_manager_total_is_weighted_sum_of_terms():
    outputs = manager_outputs()
    manager = LossManager(weights={"share": 0.3, "sae": 0.2, "primitive": 0.4}, share_k=2, sae_l1_coefficient=0.05,
                          task_kind="soft_iou")
    total, log = manager(step=3, **outputs)
    h, groups = outputs["h"].detach().double().numpy(), outputs["groups"].numpy()
    expected = (soft_iou_loss(outputs["logits"], outputs["targets"]).item() + 0.3 * share_reference(h, groups, 2)
                + 0.2 * sae_loss(outputs["h"], outputs["h_hat"], outputs["z"], 0.05).item()
                + 0.4 * primitive_loss(outputs["primitive_logits"], outputs["multi_hot"]).item())
    assert abs(total.item() - expected) < 1e-5 and abs(log["loss"] - expected) < 1e-5
    assert {"task", "share", "sae", "primitive", "share_groups_used", "share_groups_skipped", "sae_l1_coefficient"} <= set(log)
    assert all(isinstance(value, (int, float)) for value in log.values())
    total.backward()
    assert outputs["h"].grad.abs().sum() > 0 and outputs["logits"].grad.abs().sum() > 0


@pytest.mark.parametrize("switched_off", ["share", "sae", "primitive"])
def test_loss_manager_does_not_compute_zero_weight_terms(switched_off, monkeypatch):
    calls = []
    for name in ("share_loss", "sae_loss", "primitive_loss"):
        original = getattr(losses, name)
        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(losses, name, spy)
    manager = LossManager(weights={switched_off: 0.0}, share_k=2)
    total, log = manager(**manager_outputs())
    function = {"share": "share_loss", "sae": "sae_loss", "primitive": "primitive_loss"}[switched_off]
    assert function not in calls and len(calls) == 2
    assert switched_off not in log and f"weight_{switched_off}" not in log


def test_loss_manager_skips_terms_with_missing_inputs_and_scheduled_zero_weights():
    outputs = manager_outputs()
    manager = LossManager(share_k=2, schedules={"share": Schedule("linear", warmup_steps=10, total_steps=20)})
    assert "share" not in manager(step=5, **outputs)[1]
    assert manager(step=15, **outputs)[1]["weight_share"] == pytest.approx(0.05)
    log = manager(step=15, **{**outputs, "z": None, "multi_hot": None})[1]
    assert "sae" not in log and "primitive" not in log and "share" in log
    with pytest.raises(ValueError, match="no loss term could be computed"): LossManager(weights={"task": 0.0})(h=outputs["h"])
    with pytest.raises(TypeError, match="unknown loss input"): manager(logit=outputs["logits"])
    with pytest.raises(ValueError, match="unknown \\['prim'\\]"): LossManager(weights={"prim": 0.5})
    assert DEFAULT_WEIGHTS == {"task": 1.0, "share": 0.1, "sae": 0.1, "primitive": 0.5}


def test_loss_manager_updates_state_only_when_training():
    outputs = manager_outputs()
    controller, ema = SAECoefficientController(warmup_steps=0, target_rate=0.05), EMAProjector(decay=0.5)
    manager = LossManager(share_k=2, share_reference=ema, sae_l1_coefficient=controller)
    manager(**outputs)
    assert controller.steps == 1 and ema.steps == 1 and ema.reference.shape == (6, 6)
    with torch.no_grad(): manager(**outputs)
    manager(update=False, **outputs)
    assert controller.steps == 1 and ema.steps == 1
    manager(update=True, **outputs)
    assert controller.steps == 2 and ema.steps == 2


# ---------------------------------------------------------------- packaging
def test_module_imports_without_notebook_dependencies():
    code = "import sys, so8lab.losses; bad = {'fastcore', 'nbdev', 'plotly', 'ipywidgets'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
