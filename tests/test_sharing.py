"""Tests of so8lab.sharing (H4 glue over so8lab.cka).

References are written here independently of the module: debiased CKA from the unbiased HSIC_1 of Song et al.
(2012) with explicit n×n matrices, principal angles from eigenvectors of group covariances (eigh, not the SVD the
module uses), per-layer cell-token means sliced by hand from `return_hidden` states, and synthetic representations
whose sharing is known (one shared subspace across groups versus independent random subspaces)."""
import json
import math
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from so8lab.cka import unit_statistics
from so8lab.models import GridModel, ModelConfig
from so8lab.primitives import composition_ids
from so8lab.cka import cka_matrix
from so8lab.sharing import (CKA_PERMUTATIONS, POSTHOC_SAMPLES, POSTHOC_STEPS, REPRESENTATIONS, SHARING_CONTROLS, SHARING_METHODS,
                            SHARING_SPLITS, Representations, collect_representations, dashboard_from_record, dashboard_record,
                            group_cka_null, layer_group_cka, paired_tasks, posthoc_sae, posthoc_target_l0, sae_summary, sharing_job,
                            sharing_jobs, sharing_metrics)
from so8lab.runner import run_jobs
from so8lab.sae import plot_unit_dashboard, sae_loss_recovered, unit_dashboard
from so8lab.sharing import _centred_grams, _mean_pairwise_cka, _null_orders
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
    torch.testing.assert_close(collected.cells, direct.h_cells, rtol=1e-5, atol=1e-5)
    assert collected.cells.shape == (len(tasks), model.config.cells, 8)
    assert list(collected.layers) == ["layer 1", "layer 2"]
    for i, name in enumerate(collected.layers):
        torch.testing.assert_close(collected.layers[name], direct.hidden[i][:, context_tokens:].mean(1), rtol=1e-5, atol=1e-5)
    for value in (collected.h, collected.cells, collected.z, *collected.layers.values()):
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
    with pytest.raises(ValueError, match="cells has 3 rows but composition has"):
        Representations(shared.h, shared.z, {}, shared.composition, shared.multi_hot, shared.inputs, shared.h[:3, None])
    with pytest.raises(ValueError, match=r"cells must be \[n, N, D\] with D = 24 \(the width of h\), got shape \(1200, 24\)"):
        Representations(shared.h, shared.z, {}, shared.composition, shared.multi_hot, shared.inputs, shared.h)
    with pytest.raises(TypeError, match="cells must be a torch.Tensor"):
        Representations(shared.h, shared.z, {}, shared.composition, shared.multi_hot, shared.inputs, shared.h.numpy())
    assert Representations(shared.h, shared.z, {}, shared.composition, shared.multi_hot, shared.inputs).cells is None   # older callers


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
    assert metrics["selective_units"] >= 6 and metrics["selective_fraction"] == metrics["selective_units"] / 10   # ÷ the 10 alive units


def test_alive_units_are_counted_over_the_whole_evaluation_set():
    """A unit active on one sample of a skipped small group is alive (the denominator) but untested; all dead: NaN."""
    data = make(1.0, small=(3,))
    z = data.z.clone(); z[:, 8:] = 0
    z[0, 9] = 0.5                  # alive on one sample of a used group: tested
    z[-1, 12] = 0.5                # alive on one sample of the skipped group only
    metrics = sharing_metrics(Representations(data.h, z, {}, data.composition, data.multi_hot, data.inputs), k=4)
    alive = sum(bool((z[:, u] > 0).any()) for u in range(20))
    assert alive == 10 and (metrics["alive_units"], metrics["unit_tests"], metrics["groups_skipped"]) == (10, 9 * 6, 1)
    assert metrics["selective_fraction"] == metrics["selective_units"] / 10
    silent = Representations(data.h, torch.zeros_like(z), {}, data.composition, data.multi_hot, data.inputs)
    quiet = sharing_metrics(silent, k=4)
    assert (quiet["alive_units"], quiet["unit_tests"], quiet["selective_units"]) == (0, 0, 0) and math.isnan(quiet["selective_fraction"])


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


# ---------------------------------------------------------------------------------------------------------------
# The permutation null of cross-task CKA


def brute_force_null(groups, orders):
    "The statistic for each order, recomputed from explicitly reordered copies of the data with the textbook HSIC_1."
    values = []
    for order in orders:
        moved = [x[o] - x[o].mean(0) for x, o in zip(groups, order)]
        values.append(np.mean([debiased_cka(a, b) for i, a in enumerate(moved) for b in moved[i + 1:]]))
    return np.array(values)


@pytest.mark.parametrize("groups, rows, width", [(4, 6, 3), (3, 9, 20), (5, 7, 7)])
def test_vectorised_null_equals_brute_force(groups, rows, width):
    rng = np.random.default_rng(groups)
    data = [rng.standard_normal((rows, width)) + 0.5 * rng.standard_normal((rows, 1)) for _ in range(groups)]
    orders = _null_orders(6, groups, rows, seed=3)
    assert orders.shape == (6, groups, rows) and all(sorted(o) == list(range(rows)) for o in orders.reshape(-1, rows))
    grams, self_hsic = _centred_grams(data)
    np.testing.assert_allclose(_mean_pairwise_cka(grams, self_hsic, orders), brute_force_null(data, orders), rtol=0, atol=1e-10)
    for order in orders[:2]:   # and against the module's own cka_matrix
        table = cka_matrix({g: x[o] for g, (x, o) in enumerate(zip(data, order))}, debiased=True).to_numpy()
        assert _mean_pairwise_cka(grams, self_hsic, order[None])[0] == pytest.approx(table[np.triu_indices(groups, 1)].mean(), abs=1e-10)
    identity = np.arange(rows)[None].repeat(groups, 0)[None]
    assert group_cka_null(data, 0)["cka_debiased"] == pytest.approx(brute_force_null(data, identity)[0], abs=1e-10)


def test_null_uses_the_seeded_orders():
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((8, 5)) for _ in range(3)]
    result = group_cka_null(data, 50, seed=7)
    null = brute_force_null(data, _null_orders(50, 3, 8, seed=7))
    assert result["cka_null_mean"] == pytest.approx(null.mean(), abs=1e-10)
    assert result["cka_null_sd"] == pytest.approx(null.std(ddof=1), abs=1e-10)
    assert result["cka_null_p"] == (1 + np.sum(null >= result["cka_debiased"] - 1e-12)) / 51
    assert group_cka_null(data, 50, seed=7) == result and group_cka_null(data, 50, seed=8) != result


def test_null_separates_grid_only_from_independent_representations():
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((32, 16))   # depends only on the grid: the same under every composition (up to rotation)
    perfect = group_cka_null([grid @ np.linalg.qr(rng.standard_normal((16, 16)))[0] for _ in range(12)], 500, seed=0)
    assert perfect["cka_debiased"] == pytest.approx(1.0, abs=1e-12) and perfect["cka_null_p"] == 1 / 501 <= 0.05
    assert abs(perfect["cka_null_mean"]) < 0.01
    p = [group_cka_null([np.random.default_rng((seed, g)).standard_normal((32, 16)) for g in range(12)], 500, seed=seed)["cka_null_p"]
         for seed in range(20)]
    assert np.median(p) > 0.2 and sum(x <= 0.05 for x in p) <= 3     # roughly uniform under the null


def test_null_in_sharing_metrics(shared_metrics):
    m = shared_metrics
    assert m["cka_permutations"] == 200 and m["cka_null_p"] == 1 / 201 and abs(m["cka_null_mean"]) < 0.01 < m["cka_debiased"]
    independent = sharing_metrics(make(0.0), k=4)
    assert independent["cka_null_p"] > 0.05
    off = sharing_metrics(make(0.0), k=4, cka_permutations=0)
    assert off["cka_debiased"] == independent["cka_debiased"] and math.isnan(off["cka_null_p"]) and off["cka_permutations"] == 0


def test_group_cka_null_errors():
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(ValueError, match="matrices must hold at least 2 groups"): group_cka_null([x])
    with pytest.raises(ValueError, match=r"matrices must have the same number of rows \(one per shared grid\), got \[5, 8\]"): group_cka_null([x, x[:5]])
    with pytest.raises(ValueError, match="n_permutations must be"): group_cka_null([x, x], n_permutations=2.5)
    with pytest.raises(ValueError, match=r"matrices\[1\] has no variance"): group_cka_null([x, np.ones((8, 3))])


# ---------------------------------------------------------------------------------------------------------------
# At the cell tokens the decoder reads


def with_cells(data, tokens=4, spread=0., grid_only=False, rank=4, seed=0):
    """`data` with `tokens` cell tokens per sample whose mean is h: h plus rank-`rank` residuals with zero mean over the
    cells, drawn per sample (not shared across compositions) or as a function of the grid (shared)."""
    n, width = data.h.shape
    _, grid = np.unique(data.inputs.reshape(n, -1).numpy(), axis=0, return_inverse=True)
    rng = np.random.default_rng(seed)
    latent, mapping = rng.standard_normal((n, rank)), rng.standard_normal((rank, tokens * width))
    residual = ((latent[grid.ravel()] if grid_only else latent) @ mapping).reshape(n, tokens, width)
    cells = data.h[:, None].double() + spread * torch.tensor(residual - residual.mean(1, keepdims=True))
    return Representations(data.h, data.z, data.layers, data.composition, data.multi_hot, data.inputs, cells.float())


def both_levels(data, **options):
    return {level: sharing_metrics(data, k=4, **options, representation=level) for level in REPRESENTATIONS}


def test_repeated_tokens_measure_what_h_measures():
    metrics = both_levels(with_cells(make(0.6, groups=10)))
    for key in ("cka_debiased", "cka_null_mean", "cka_null_p", "grassmann_geodesic", "relative_eigengap_median"):
        assert metrics["cells"][key] == pytest.approx(metrics["h"][key], abs=1e-9)
    assert abs(metrics["cells"]["probe_transfer_auroc"] - metrics["h"]["probe_transfer_auroc"]) < 0.05   # same span, other L2 scale


@pytest.mark.parametrize("sharing, grid_only, higher", [(1.0, False, "h"), (0.0, True, "cells")])
def test_levels_differ_as_constructed(sharing, grid_only, higher):
    "Shared h with per-sample token residuals: high CKA at h, low at the cells; unshared h with grid-only residuals: the reverse."
    metrics = both_levels(with_cells(make(sharing), spread=3., grid_only=grid_only))
    lower = "cells" if higher == "h" else "h"
    assert metrics[higher]["cka_debiased"] > 0.8 and abs(metrics[lower]["cka_debiased"]) < 0.1
    assert metrics[higher]["cka_null_p"] == 1 / 201
    assert metrics[higher]["grassmann_geodesic"] < metrics[lower]["grassmann_geodesic"]


def test_cells_definitions():
    "Cells-level CKA is CKA of the flattened tokens; Grassmann uses each composition's pooled token cloud."
    data = with_cells(make(0.5, groups=5), tokens=3, spread=1.)
    metrics = sharing_metrics(data, k=3, representation="cells")
    cells = data.cells.double().numpy()
    groups = [cells[(data.composition == g).numpy()] for g in data.composition.unique()]
    pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    flat = lambda x: x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0)
    assert metrics["cka_debiased"] == pytest.approx(np.mean([debiased_cka(flat(a), flat(b)) for a, b in pairs]), abs=1e-10)
    cloud = lambda x: x.reshape(-1, x.shape[-1])
    assert metrics["grassmann_geodesic"] == pytest.approx(np.mean([geodesic(cloud(a), cloud(b), 3) for a, b in pairs]), abs=1e-6)
    assert not {"units", "selective_units", "selective_fraction"} & set(metrics)     # the SAE reads h
    assert {"units", "selective_units", "selective_fraction"} <= set(sharing_metrics(data, k=3))


def test_cells_errors(shared):
    with pytest.raises(ValueError, match=r"representation='cells' needs the cell tokens, but representations.cells is None"):
        sharing_metrics(shared, k=4, representation="cells")
    with pytest.raises(ValueError, match=r"representation must be one of \['h', 'cells'\], got 'z'"):
        sharing_metrics(shared, k=4, representation="z")
    with pytest.raises(ValueError, match="cka_permutations must be"):
        sharing_metrics(shared, k=4, cka_permutations=-1)


# ---------------------------------------------------------------------------------------------------------------
# Jobs


def test_sharing_jobs_cover_the_controls(tmp_path):
    jobs = sharing_jobs("smoke", tmp_path, seeds=[0, 1])
    assert SHARING_METHODS == ("proposed", "B0", "B1", "B2") and SHARING_CONTROLS == {"B2": "B0", "proposed": "B1"}
    assert [j.name for j in jobs] == [f"{m}-seed{s}-{split}" for m in SHARING_METHODS for s in (0, 1) for split in SHARING_SPLITS]
    for job in jobs:
        (base,) = job.inputs
        assert job.config["base_config_hash"] == base.digest and base.config["method"] == job.config["method"]
        assert job.config["representations"] == ["h", "cells"] and job.config["cka_permutations"] == CKA_PERMUTATIONS
        assert job.config["heatmap"] == (job.config["seed"] == 0 and job.config["split"] == "heldout")
    trained = {j.inputs[0].config["method"]: j.inputs[0].config["train"] for j in jobs}
    assert trained["B2"]["share_weight"] > 0 == trained["B2"]["primitive_weight"] == trained["B2"]["sae_weight"]
    assert trained["B1"]["share_weight"] == 0 < trained["B1"]["primitive_weight"]
    cpu = sharing_jobs("cpu", tmp_path, seeds=[0])
    assert {(j.config["posthoc_target_l0"], j.config["posthoc_samples"], j.config["posthoc_steps"]) for j in cpu} == {(16, POSTHOC_SAMPLES, POSTHOC_STEPS)}
    assert {(j.config["posthoc_target_l0"], j.config["posthoc_samples"], j.config["posthoc_steps"]) for j in jobs} == {(8, 512, 100)}
    longer = sharing_job("B0", 0, "cpu", tmp_path, "heldout", 32, posthoc_steps=POSTHOC_STEPS + 1)
    assert longer.digest != cpu[2].digest and cpu[2].name == "B0-seed0-heldout"     # the post-hoc settings are part of the hash


# ---------------------------------------------------------------------------------------------------------------
# Sparse units, like with like


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GridModel(ModelConfig(d_model=32, bottleneck_dim=16, layers=2, heads=2, sae_width=24, patch_size=2)).eval()


def encode_by_hand(sae, h):
    "z and ĥ of a SparseAutoencoder written out in numpy, float64."
    weights = {name: p.detach().double().numpy() for name, p in sae.named_parameters()}
    z = np.maximum((h - weights["decoder_bias"]) @ weights["encoder_weight"].T + weights["encoder_bias"], 0)
    return z, z @ weights["decoder_weight"].T + weights["decoder_bias"]


@pytest.fixture(scope="module")
def tiny_setup():
    model = tiny_model()
    tasks = paired_tasks("heldout", 12, composition_ids(HELDOUT)[:6])
    sae, fit = posthoc_sae(model, samples=400, steps=120, seed=1)
    return model, tasks, collect_representations(model, tasks), sae, fit


@pytest.mark.parametrize("width, target", [(1, 4), (24, 4), (64, 4), (79, 4), (80, 5), (128, 8), (256, 16), (512, 32)])
def test_posthoc_target_l0(width, target):
    assert posthoc_target_l0(width) == target


def test_posthoc_sae_fits_training_tasks_deterministically(tiny_setup):
    model, _, _, sae, fit = tiny_setup
    tasks = sample_tasks(400, "train", 1, with_demo=True, stream="posthoc_sae")
    assert set(tasks.composition.tolist()) <= set(composition_ids(split_compositions("train")).tolist())
    with torch.no_grad(): h = model.forward_batch(tasks).h.double().numpy()
    z, _ = encode_by_hand(sae, h)
    assert fit["l0"] == pytest.approx((z > 0).sum(1).mean(), abs=1e-9)     # the L0 it reports, on its own training tasks
    assert fit["target_l0"] == 4 and fit["matched"] == (abs(fit["l0"] - 4) <= 0.4) and 1 <= fit["rounds"] <= 8
    assert set(fit) == {"l1", "l0", "rounds", "matched", "target_l0"} and tuple(sae.decoder_weight.shape) == (16, 24)
    again, refit = posthoc_sae(model, samples=400, steps=120, seed=1)
    assert refit == fit and all(torch.equal(a, b) for a, b in zip(sae.parameters(), again.parameters()))
    other, _ = posthoc_sae(model, samples=400, steps=120, seed=2)
    assert not torch.equal(other.encoder_weight, sae.encoder_weight)


def test_sae_summary_against_references(tiny_setup):
    model, tasks, representations, sae, _ = tiny_setup
    summary = sae_summary(model, representations, tasks, sae, k=4)
    h = representations.h.double().numpy()
    z, h_hat = encode_by_hand(sae, h)
    metrics, alive = summary["metrics"], int((z > 0).any(0).sum())
    assert metrics["l0"] == pytest.approx((z > 0).sum(1).mean(), abs=1e-9)
    assert metrics["explained_variance"] == pytest.approx(1 - ((h - h_hat) ** 2).sum() / ((h - h.mean(0)) ** 2).sum(), abs=1e-5)
    assert metrics["alive_units"] == alive == summary["units"]["alive_units"] and metrics["dead_units"] == 24 - alive
    assert summary["units"]["selective_fraction"] == summary["units"]["selective_units"] / alive
    reference = sae_loss_recovered(model, tasks, sae)
    kept = summary["loss_recovered"]
    assert json.dumps(kept["recovered"]) == json.dumps(reference["recovered"]) and kept["note"] == reference["note"]
    assert kept["ablated"] == {"exact_match": reference["ablated"]["exact_match"], "loss": reference["ablated"]["loss"]}
    assert set(kept) == {"recovered", "note", "clean", "reconstructed", "ablated"}
    own = sae_summary(model, representations, tasks, k=4, units=False)
    z_own, _ = encode_by_hand(model.sae, h)
    assert "units" not in own and own["metrics"]["alive_units"] == int((z_own > 0).any(0).sum())
    assert own["metrics"]["l0"] == pytest.approx((z_own > 0).sum(1).mean(), abs=1e-9)


def test_sae_summary_errors(tiny_setup):
    model, tasks, representations, sae, _ = tiny_setup
    with pytest.raises(TypeError, match="representations must be Representations"): sae_summary(model, representations.h, tasks)
    with pytest.raises(ValueError, match="tasks must be the TaskBatch of the 72 representations, got 5 tasks"): sae_summary(model, representations, tasks[:5])
    with pytest.raises(TypeError, match="sae must be a SparseAutoencoder"): sae_summary(model, representations, tasks, torch.nn.Identity())
    with pytest.raises(TypeError, match="model must be a GridModel"): sae_summary(model.sae, representations, tasks)
    with pytest.raises(ValueError, match=r"fdr must be a finite number in \(0, 1\)"): sae_summary(model, representations, tasks, sae, fdr=0)
    with pytest.raises(TypeError, match="model must be a GridModel"): posthoc_sae(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="width must be"): posthoc_target_l0(0)


def test_dashboard_round_trip(tiny_setup):
    model, tasks, representations, sae, _ = tiny_setup
    dashboard = unit_dashboard(sae.encode(representations.h), tasks, count=3, top=4)
    restored = dashboard_from_record(json.loads(json.dumps(dashboard_record(dashboard))))
    assert restored["primitives"] == dashboard["primitives"]
    for key in ("auroc", "alive"): np.testing.assert_array_equal(restored[key], dashboard[key])
    assert len(restored["units"]) == len(dashboard["units"])
    for before, after in zip(dashboard["units"], restored["units"]):
        assert set(after) == set(before)
        for key, value in before.items():
            if isinstance(value, np.ndarray):
                assert isinstance(after[key], np.ndarray) and after[key].shape == value.shape
                np.testing.assert_array_equal(after[key], value)
            else: assert after[key] == value
    assert len(plot_unit_dashboard(restored, units=2).axes) == 6
    with pytest.raises(TypeError, match="record must be a dict from dashboard_record"): dashboard_from_record([])
    with pytest.raises(TypeError, match="dashboard must be a dict from unit_dashboard"): dashboard_record({})


def test_sharing_job_records_both_saes(tmp_path):
    "A B0 job on the smoke preset: its own SAE is marked untrained, the heldout and val jobs fit the same post-hoc SAE."
    jobs = [sharing_job("B0", 0, "smoke", tmp_path, split, 8, compositions=6, heatmap=split == "heldout", posthoc_samples=256,
                        posthoc_steps=60) for split in SHARING_SPLITS]
    heldout, val = run_jobs(jobs)
    for record in (heldout, val):
        assert set(record["sae"]) == {"posthoc", "own"} and record["sae"]["own"]["trained"] is False
        assert set(record["sae"]["posthoc"]) == {"fit", "metrics", "units", "loss_recovered"} and "units" not in record["sae"]["own"]
        assert record["sae"]["posthoc"]["fit"]["target_l0"] == 8 == record["posthoc_target_l0"]
        units = record["sae"]["posthoc"]["units"]
        assert units["alive_units"] == record["sae"]["posthoc"]["metrics"]["alive_units"]
    assert heldout["sae"]["posthoc"]["fit"] == val["sae"]["posthoc"]["fit"]
    assert "unit_dashboard" in heldout and "unit_dashboard" not in val
    assert dashboard_from_record(heldout["unit_dashboard"])["auroc"].shape == (128, 6)



def test_prepare_records_trains_every_sharing_method_first(tmp_path, monkeypatch):
    "The H4 path of `so8lab.reports.prepare_records` trains all of SHARING_METHODS in one `run_many` (in parallel) before the analyses."
    import so8lab.reports as reports
    calls = []
    monkeypatch.setattr(reports, "run_many", lambda methods, seeds, *args, **options: calls.append(("train", tuple(methods), list(seeds))) or [])
    monkeypatch.setattr(reports, "run_jobs", lambda jobs, *args, **options: calls.append(("analyses", len(jobs))) or [])
    reports.prepare_records(["H4_sharing"], "smoke", tmp_path, {"seeds": [0]}, workers=2, log=False)
    assert calls == [("train", SHARING_METHODS, [0]), ("train", ("proposed", "B0"), [0]), ("analyses", 8)]   # the second reads them
    calls.clear()
    reports.prepare_records(["H4_sharing"], "smoke", tmp_path, {"seeds": [0]}, log=False, train=False)
    assert calls == [("train", ("proposed", "B0"), [0]), ("analyses", 8)]      # committed records only: nothing is trained
