"""Tests of so8lab.sharing (H4 glue over so8lab.cka).

References are written here independently of the module: debiased CKA from the unbiased HSIC_1 of Song et al.
(2012) with explicit n×n matrices, principal angles from eigenvectors of group covariances (eigh, not the SVD the
module uses), per-layer cell-token means sliced by hand from `return_hidden` states, and synthetic representations
whose sharing is known (one shared subspace across groups versus independent random subspaces)."""
import math
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from so8lab.cka import unit_statistics
from so8lab.models import GridModel, ModelConfig
from so8lab.primitives import composition_ids
from so8lab.sharing import Representations, collect_representations, layer_group_cka, paired_tasks, sharing_metrics
from so8lab.tasks import sample_tasks, split_compositions

HELDOUT = split_compositions("heldout")


from reference import hsic_unbiased_textbook as hsic1


def debiased_cka(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return hsic1(K, L) / math.sqrt(hsic1(K, K) * hsic1(L, L))


def top_basis(X, k):
    "Top-k principal directions from the eigenvectors of the covariance (an independent route to the SVD's)."
    values, vectors = np.linalg.eigh(np.cov(X, rowvar=False))
    return vectors[:, np.argsort(values)[::-1][:k]]


def geodesic(X, Y, k):
    cosines = np.linalg.svd(top_basis(X, k).T @ top_basis(Y, k), compute_uv=False)
    return np.linalg.norm(np.arccos(np.clip(cosines, -1, 1)))


def make(sharing, groups=30, grids=40, width=24, seed=0, small=(), unit_offsets=False):
    """Synthetic representations of held-out compositions on the same grids.

    h = (latent features of the grid) @ map + (labels) @ signal + noise. `sharing` in [0, 1] blends a map, latent
    features and label directions common to all groups (1) with group-specific ones (0). Sparse units 0-5 fire on
    primitives 0-5 when sharing = 1; `unit_offsets` instead gives every unit a random offset per composition."""
    rng = np.random.default_rng(seed)
    rows = [0, *np.random.default_rng(1).permutation(np.arange(1, 120))][:groups + len(small)]
    table = HELDOUT[rows]
    ids, labels = composition_ids(table), torch.zeros(len(rows), 6).scatter_(1, table, 1.).numpy()
    latent = rng.standard_normal((grids, 4 * 121))
    grid = torch.randint(0, 4, (grids, 8, 8), generator=torch.Generator().manual_seed(seed))
    common_map, common_signal = rng.standard_normal((4, width)), rng.standard_normal((6, width))
    h, z, composition, multi_hot, inputs = [], [], [], [], []
    for g, index in enumerate(ids.tolist()):
        n = grids if g < groups else small[g - groups]
        own = latent[:n, 4 * (g + 1):4 * (g + 2)] @ rng.standard_normal((4, width)) + labels[g] @ rng.standard_normal((6, width))
        common = latent[:n, :4] @ common_map + labels[g] @ common_signal
        h.append(sharing * common + (1 - sharing) * own + 0.3 * rng.standard_normal((n, width)))
        drive = rng.standard_normal(20) if unit_offsets else np.pad(labels[g], (0, 14)) * (sharing == 1)
        z.append(np.maximum(2 * drive + rng.standard_normal((n, 20)) - 1, 0))
        composition.append(torch.full((n,), index)); multi_hot.append(torch.tensor(labels[g]).float().expand(n, 6)); inputs.append(grid[:n])
    h = torch.tensor(np.vstack(h)).float()
    return Representations(h, torch.tensor(np.vstack(z)).float(), {"layer 1": 2 * h}, torch.cat(composition),
                           torch.cat(multi_hot), torch.cat(inputs))


@pytest.fixture(scope="module")
def shared():
    return make(1.0)


@pytest.fixture(scope="module")
def shared_metrics(shared):
    return sharing_metrics(shared, k=4)


# ---------------------------------------------------------------------------------------------------------------
# Paired task sets


@pytest.mark.parametrize("split", ["heldout", "val", "heldout_any"])
def test_paired_tasks_share_grids(split):
    ids = composition_ids(split_compositions(split))
    batch = paired_tasks(split, 6, ids[[0, 5, 9]], seed=3)
    grids = batch.inputs.reshape(3, 6, 8, 8)
    assert (grids == grids[:1]).all()
    assert batch.composition.tolist() == ids[[0, 5, 9]].repeat_interleave(6).tolist()
    for g in range(3):   # labels constant within a group, and equal to the composition's primitives
        steps = split_compositions(split)[[0, 5, 9][g]]
        expected = torch.zeros(6); expected[steps[steps >= 0]] = 1
        assert (batch.multi_hot[g * 6:(g + 1) * 6] == expected).all()
    assert batch.demo_inputs is not None


def test_paired_tasks_grids_are_the_split_stream():
    "The shared grids are the split's own stream: equal to a fresh sample_tasks draw without redraws."
    reference = sample_tasks(10, "val", 0, composition=torch.full((10,), 8), max_attempts=1)
    batch = paired_tasks("val", 10, [3, 8, 11])
    assert torch.equal(batch.inputs[10:20], reference.inputs) and torch.equal(batch.tokens[10:20], reference.tokens)


def test_paired_tasks_max_compositions():
    batch = paired_tasks("heldout", 1, max_compositions=5)
    ids = composition_ids(HELDOUT)
    assert batch.composition.tolist() == ids[[0, 30, 60, 89, 119]].tolist()   # rounded linspace(0, 119, 5)
    assert len(paired_tasks("val", 1, max_compositions=1000)) == 36   # 6 singles + 30 trained pairs


@pytest.mark.parametrize("arguments, message", [
    (dict(split="heldout", inputs_per_group=0), "inputs_per_group must be a positive integer"),
    (dict(split="heldout", inputs_per_group=True), "inputs_per_group must be a positive integer"),
    (dict(split="heldout", inputs_per_group=2, compositions=[50, 50]), "compositions must be at least 2 distinct"),
    (dict(split="heldout", inputs_per_group=2, compositions=[[50, 51]]), "compositions must be at least 2 distinct"),
    (dict(split="val", inputs_per_group=2, compositions=[0, 60]), "not compositions of this split"),
    (dict(split="heldout", inputs_per_group=2, max_compositions=1), "max_compositions must be an integer >= 2"),
    (dict(split="train2", inputs_per_group=2), r"split must be one of \[.*\], got 'train2'"),
])
def test_paired_tasks_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        paired_tasks(**arguments)


# ---------------------------------------------------------------------------------------------------------------
# Collecting representations


@pytest.mark.parametrize("overrides, context_tokens", [
    (dict(), 9),                                                    # program tokens precede the cells
    (dict(fusion="cross_attention"), 0),                            # cells only in the encoder sequence
    (dict(conditioning="demo", patch_size=2), 2 * 16),              # demo input + output cells precede the query cells
    (dict(encoder="gru", patch_size=2), 9),
])
def test_collect_representations_matches_forward(overrides, context_tokens):
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(d_model=16, bottleneck_dim=8, layers=2, heads=2, sae_width=12, patch_size=1), **overrides})
    model = GridModel(config).train()
    tasks = paired_tasks("heldout", 7, composition_ids(HELDOUT)[:3])
    collected = collect_representations(model, tasks, batch_size=5)
    assert model.training
    model.eval()
    with torch.no_grad():
        direct = model(tasks.inputs, tasks.tokens, tasks.demo_inputs, tasks.demo_outputs, return_hidden=True)
    torch.testing.assert_close(collected.h, direct.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collected.z, direct.z, rtol=1e-5, atol=1e-5)
    assert list(collected.layers) == ["layer 1", "layer 2"]
    for i, name in enumerate(collected.layers):
        torch.testing.assert_close(collected.layers[name], direct.hidden[i][:, context_tokens:].mean(1), rtol=1e-5, atol=1e-5)
    for value in (collected.h, collected.z, *collected.layers.values()):
        assert value.device.type == "cpu" and value.dtype == torch.float32 and not value.requires_grad
    assert torch.equal(collected.composition, tasks.composition) and torch.equal(collected.inputs, tasks.inputs)


def test_collect_representations_errors():
    model = GridModel(ModelConfig(d_model=16, bottleneck_dim=8, layers=2, heads=2, sae_width=12))
    tasks = paired_tasks("val", 2, [0, 1])
    with pytest.raises(TypeError, match="model must be a GridModel"): collect_representations(torch.nn.Linear(2, 2), tasks)
    with pytest.raises(TypeError, match="tasks must be a TaskBatch"): collect_representations(model, tasks.tensors())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"): collect_representations(model, tasks, batch_size=-1)


def test_representations_validation(shared):
    with pytest.raises(ValueError, match="z has 3 rows but composition has"):
        Representations(shared.h, shared.z[:3], {}, shared.composition, shared.multi_hot, shared.inputs)
    with pytest.raises(ValueError, match=r"layers\['layer 1'\] has 2 rows"):
        Representations(shared.h, shared.z, {"layer 1": shared.h[:2]}, shared.composition, shared.multi_hot, shared.inputs)
    with pytest.raises(TypeError, match="multi_hot must be a torch.Tensor"):
        Representations(shared.h, shared.z, {}, shared.composition, shared.multi_hot.numpy(), shared.inputs)
    with pytest.raises(TypeError, match="layers must be a dict"):
        Representations(shared.h, shared.z, [shared.h], shared.composition, shared.multi_hot, shared.inputs)


# ---------------------------------------------------------------------------------------------------------------
# Metrics: known answers and references


def test_shared_versus_independent(shared_metrics):
    independent = sharing_metrics(make(0.0), k=4)
    assert shared_metrics["cka_debiased"] > 0.9 and abs(independent["cka_debiased"]) < 0.1
    assert shared_metrics["grassmann_geodesic"] < 0.3 < 1.5 < independent["grassmann_geodesic"]
    assert shared_metrics["probe_transfer_auroc"] > 0.95 and abs(independent["probe_transfer_auroc"] - 0.5) < 0.1
    assert independent["probe_within_auroc"] > 0.8        # the probe does fit its own compositions
    assert shared_metrics["selective_units"] >= 6 and independent["selective_units"] == 0


def test_metrics_move_monotonically_with_sharing():
    levels = [sharing_metrics(make(s), k=4) for s in (0.0, 0.5, 0.8, 1.0)]
    cka = [m["cka_debiased"] for m in levels]
    distance = [m["grassmann_geodesic"] for m in levels]
    transfer = [m["probe_transfer_auroc"] for m in levels]
    assert cka == sorted(cka) and distance == sorted(distance, reverse=True) and transfer == sorted(transfer)


def test_split_half_distance_is_the_noise_level(shared_metrics):
    data = make(1.0)
    noise = torch.randn(data.h.shape, generator=torch.Generator().manual_seed(2))
    metrics = sharing_metrics(Representations(noise, data.z, {}, data.composition, data.multi_hot, data.inputs), k=4)
    assert metrics["grassmann_geodesic"] > 1.5 and abs(metrics["grassmann_split_half"] - metrics["grassmann_geodesic"]) < 0.2
    assert shared_metrics["grassmann_split_half"] < 0.3 and metrics["relative_eigengap_median"] < 0.2 < shared_metrics["relative_eigengap_median"]
    assert math.isnan(sharing_metrics(make(1.0, grids=9), k=4)["grassmann_split_half"])    # 9 < 2(k + 1) samples per group


def test_references(shared_metrics):
    data = make(0.3, groups=8)
    metrics = sharing_metrics(data, k=3)
    h = data.h.double().numpy()
    groups = [h[(data.composition == g).numpy()] for g in data.composition.unique()]
    pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    assert metrics["cka_debiased"] == pytest.approx(np.mean([debiased_cka(a - a.mean(0), b - b.mean(0)) for a, b in pairs]), abs=1e-10)
    assert metrics["grassmann_geodesic"] == pytest.approx(np.mean([geodesic(a, b, 3) for a, b in pairs]), abs=1e-6)
    sigma = [np.sqrt(np.sort(np.linalg.eigvalsh(np.cov(g, rowvar=False)))[::-1]) for g in groups]
    assert metrics["eigengap_median"] == pytest.approx(np.median([s[2] - s[3] for s in sigma]), abs=1e-10)
    assert metrics["relative_eigengap_median"] == pytest.approx(np.median([(s[2] - s[3]) / s[2] for s in sigma]), abs=1e-10)
    assert (metrics["groups"], metrics["groups_used"], metrics["shared_inputs"], metrics["units"]) == (8, 8, 40, 20)


def test_permutations_are_adequate(shared_metrics):
    m = shared_metrics
    assert m["unit_tests"] == m["alive_units"] * 6 == 120
    assert m["unit_tests"] / (m["permutations"] + 1) <= 0.05 / 2     # a lone unit beating every permutation has q <= fdr/2
    assert sharing_metrics(make(1.0), k=4, fdr=0.01)["permutations"] == math.ceil(2 * 120 / 0.01)


def test_units_are_tested_per_composition():
    """Units with a random offset per composition (unrelated to the primitives) are not selective; a per-sample test
    would call most of them significant, because every sample of a composition repeats its label."""
    data = make(1.0, unit_offsets=True)
    assert sharing_metrics(data, k=4)["selective_units"] <= 1
    per_sample = unit_statistics(data.z, data.multi_hot, n_permutations=999, seed=0)
    assert per_sample.query("q_auroc < 0.05").unit.nunique() >= 10


def test_dead_units_are_not_tested(shared):
    z = shared.z.clone(); z[:, 10:] = 0
    metrics = sharing_metrics(Representations(shared.h, z, shared.layers, shared.composition, shared.multi_hot, shared.inputs), k=4)
    assert (metrics["units"], metrics["alive_units"], metrics["unit_tests"]) == (20, 10, 60)
    assert metrics["selective_fraction"] == metrics["selective_units"] / 20


def test_probe_ignores_labels_constant_on_a_half():
    """A primitive used by a single composition is constant on one half of every split of the compositions, so it
    has no detector to transfer: the probe AUROC equals that of the data without this label."""
    data = make(0.7, groups=12)
    rare = torch.cat([data.multi_hot, (data.composition == data.composition[0]).float()[:, None]], 1)
    with_rare = Representations(data.h, data.z, data.layers, data.composition, rare, data.inputs)
    a, b = sharing_metrics(with_rare, k=4, probe_iterations=2000), sharing_metrics(data, k=4, probe_iterations=2000)
    assert a["probe_transfer_auroc"] == pytest.approx(b["probe_transfer_auroc"], abs=1e-6)


def test_small_groups_are_skipped_and_counted(shared_metrics):
    with_small = sharing_metrics(make(1.0, small=(3, 5, 7)), k=4)
    assert (with_small["groups"], with_small["groups_used"], with_small["groups_skipped"]) == (33, 30, 3)
    same = lambda m: {k: v for k, v in m.items() if not k.startswith("groups")}
    assert same(with_small) == same(shared_metrics)
    assert sharing_metrics(make(1.0, small=(3, 5, 7)), k=2, min_group_size=5)["groups_skipped"] == 1


def test_unpaired_groups_give_nan_cka():
    data = make(1.0, groups=6)
    shuffled = torch.randint(0, 4, data.inputs.shape, generator=torch.Generator().manual_seed(1))   # no grid repeats across groups
    metrics = sharing_metrics(Representations(data.h, data.z, data.layers, data.composition, data.multi_hot, shuffled), k=4)
    assert metrics["shared_inputs"] == 0 and math.isnan(metrics["cka_debiased"])
    assert metrics["grassmann_geodesic"] < 0.3          # the other measures need no pairing


@settings(max_examples=5)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 10))
def test_invariant_to_rotation_and_scale_of_h(seed, scale):
    data = make(0.5, groups=10)
    rotation = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    moved = Representations((scale * data.h.double() @ rotation), data.z, data.layers, data.composition, data.multi_hot, data.inputs)
    a, b = sharing_metrics(data, k=4), sharing_metrics(moved, k=4)
    for key in ("cka_debiased", "grassmann_geodesic", "relative_eigengap_median"):
        assert b[key] == pytest.approx(a[key], abs=1e-5)
    assert b["eigengap_median"] == pytest.approx(scale * a["eigengap_median"], rel=1e-5)
    assert b["probe_transfer_auroc"] == pytest.approx(a["probe_transfer_auroc"], abs=1e-4)   # the probe objective is strictly convex


@pytest.mark.parametrize("arguments, error, message", [
    (dict(k=0), ValueError, r"k must be an integer in 1\.\.24"),
    (dict(k=25), ValueError, r"k must be an integer in 1\.\.24"),
    (dict(k=4.0), ValueError, "k must be an integer"),
    (dict(k=4, min_group_size=4), ValueError, r"min_group_size must be an integer >= 5, got 4"),
    (dict(k=4, fdr=0), ValueError, r"fdr must be a finite number in \(0, 1\), got 0"),
    (dict(k=4, min_group_size=41), ValueError, "need at least 2 composition groups with >= min_group_size=41"),
])
def test_sharing_metrics_errors(shared, arguments, error, message):
    with pytest.raises(error, match=message):
        sharing_metrics(shared, **arguments)


def test_sharing_metrics_rejects_bad_representations(shared):
    with pytest.raises(TypeError, match="representations must be Representations"):
        sharing_metrics(shared.h, k=4)
    mixed = shared.multi_hot.clone(); mixed[0] = 1 - mixed[0]
    with pytest.raises(ValueError, match="multi_hot must be constant within each composition group"):
        sharing_metrics(Representations(shared.h, shared.z, {}, shared.composition, mixed, shared.inputs), k=4)


# ---------------------------------------------------------------------------------------------------------------
# Layer × composition table


def test_layer_group_cka(shared, shared_metrics):
    table = layer_group_cka(shared, columns=None)
    assert list(table.index) == ["layer 1", "h"] and table.shape == (2, 30)
    assert table.loc["h"].mean() == pytest.approx(shared_metrics["cka_debiased"], abs=1e-12)
    assert np.allclose(table.loc["layer 1"], table.loc["h"])      # layer 1 is 2h: CKA is scale invariant
    assert table.columns[0] == "ROT90→FLIP→COLOR_SWAP"
    h = shared.h.double().numpy()
    groups = {int(g): h[(shared.composition == g).numpy()] for g in shared.composition.unique()}
    first = list(groups)[0]
    reference = np.mean([debiased_cka(groups[first] - groups[first].mean(0), x - x.mean(0)) for g, x in groups.items() if g != first])
    assert table.iloc[1, 0] == pytest.approx(reference, abs=1e-10)
    few = layer_group_cka(shared, columns=4)
    assert few.shape == (2, 4) and list(few.columns) == [table.columns[i] for i in (0, 10, 19, 29)]


def test_layer_group_cka_errors(shared):
    with pytest.raises(TypeError, match="representations must be Representations"): layer_group_cka(shared.h)
    with pytest.raises(ValueError, match="need at least 2 composition groups sharing"): layer_group_cka(shared, min_group_size=41)
