"""Reference tests of so8lab.sae (issue 13, items 4-5: like-for-like SAE analysis for H4).

References are written here independently of the module: the SAE metrics in numpy from their definitions, the
relative reconstruction bias by brute-force 1-D minimisation (scipy.optimize.minimize_scalar), AUROC by counting all
(positive, negative) pairs and by scipy.stats.mannwhitneyu, and loss recovered from its two exact anchors (a
reconstruction equal to h recovers 1, one equal to the mean of h recovers 0)."""
import math

import matplotlib.figure
import matplotlib.pyplot
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from so8lab.models import GridModel, ModelConfig, SparseAutoencoder
from so8lab.sae import (_next_l1, _recovered, fit_posthoc_sae, plot_unit_dashboard, replaced_pooled, sae_loss_recovered,
                        sae_metrics, train_sae, unit_dashboard)
from so8lab.tasks import sample_tasks
from so8lab.training import evaluate

TINY = ModelConfig(d_model=32, bottleneck_dim=16, layers=2, heads=4, sae_width=24)


# ---------------------------------------------------------------------------------------------------------------
# References (float64 numpy)


def metrics_reference(h, z, h_hat):
    "The SAE metrics straight from their definitions."
    h, z, h_hat = (np.asarray(x, np.float64) for x in (h, z, h_hat))
    residual = ((h - h_hat) ** 2).sum()
    dead = int((~(z > 0).any(0)).sum())
    cosine = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(h_hat, h)]
    return dict(l0=(z > 0).sum(1).mean(), l1=np.abs(z).sum(1).mean(),
                explained_variance=1 - residual / ((h - h.mean(0)) ** 2).sum(), dead_units=dead,
                alive_units=z.shape[1] - dead, dead_fraction=dead / z.shape[1],
                relative_reconstruction_bias=(h_hat * h_hat).sum(1).mean() / (h_hat * h).sum(1).mean(),
                mse=residual / len(h), cosine=float(np.mean(cosine)))


def brute_force_bias(h, h_hat):
    "argmin over γ of mean ‖ĥ/γ − h‖², by bounded scalar minimisation."
    h, h_hat = np.asarray(h, np.float64), np.asarray(h_hat, np.float64)
    objective = lambda gamma: ((h_hat / gamma - h) ** 2).sum(1).mean()
    return scipy.optimize.minimize_scalar(objective, bounds=(1e-3, 1e3), method="bounded", options=dict(xatol=1e-12)).x


def pair_count_auroc(scores, label):
    "P(positive > negative) + ½ P(tie) over all (positive, negative) pairs."
    difference = scores[label == 1][:, None] - scores[label == 0][None, :]
    return (difference > 0).mean() + 0.5 * (difference == 0).mean()


def dictionary_data(n=4000, dim=32, atoms=16, active=2, seed=0):
    "Positive sparse combinations of `active` of `atoms` random unit directions, shifted and scaled."
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(atoms, dim, generator=g), dim=1)
    chosen = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    weights = torch.zeros(n, atoms).scatter_(1, chosen, torch.rand(n, active, generator=g) + 0.5)
    return 5 * (weights @ directions) + 2


@pytest.fixture(scope="module")
def h_dictionary():
    return dictionary_data()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GridModel(TINY)


# ---------------------------------------------------------------------------------------------------------------
# sae_metrics


def test_sae_metrics_hand_examples():
    h = torch.tensor([[1., 0.], [0., 2.], [3., 1.]])
    z = torch.tensor([[1., 0., 0.], [2., 0., 5.], [0., 0., 1.]])
    perfect = sae_metrics(h, z, h)
    assert (perfect["dead_units"], perfect["alive_units"]) == (1, 2)
    assert perfect["l0"] == pytest.approx(4 / 3) and perfect["dead_fraction"] == pytest.approx(1 / 3)
    assert (perfect["explained_variance"], perfect["relative_reconstruction_bias"], perfect["mse"]) == (1., 1., 0.)
    half = sae_metrics(h, z, h / 2)
    assert half["relative_reconstruction_bias"] == pytest.approx(0.5)     # E[¼h·h] / E[½h·h]
    assert half["cosine"] == pytest.approx(1.)
    mean_only = sae_metrics(h, z, h.mean(0).expand_as(h))
    assert mean_only["explained_variance"] == pytest.approx(0., abs=1e-12)
    assert mean_only["relative_reconstruction_bias"] == pytest.approx(1.)  # the mean is not shrunk


@settings(max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 60), d=st.integers(1, 12), w=st.integers(1, 20),
       shrink=st.floats(0.2, 3.0), noise=st.floats(0., 1.))
def test_sae_metrics_match_definitions(seed, n, d, w, shrink, noise):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d)) + 1
    h_hat = shrink * h + noise * rng.standard_normal((n, d))
    z = np.maximum(rng.standard_normal((n, w)) - 0.5, 0)
    z[:, rng.integers(w)] = 0                                              # at least one dead unit
    got = sae_metrics(torch.tensor(h, dtype=torch.float32), torch.tensor(z, dtype=torch.float32),
                      torch.tensor(h_hat, dtype=torch.float32))
    reference = metrics_reference(h.astype(np.float32), z.astype(np.float32), h_hat.astype(np.float32))
    assert got["dead_units"] == reference["dead_units"] >= 1
    assert got["alive_units"] == reference["alive_units"]
    for key in ("l0", "l1", "dead_fraction", "mse", "cosine", "explained_variance"):
        assert got[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    if reference["relative_reconstruction_bias"] > 0:
        assert got["relative_reconstruction_bias"] == pytest.approx(reference["relative_reconstruction_bias"], rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_relative_reconstruction_bias_is_the_argmin(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(300, 16, generator=g) + 1
    h_hat = (0.3 + seed * 0.3) * h + 0.4 * torch.randn(300, 16, generator=g) + 0.2
    got = sae_metrics(h, torch.zeros(300, 3), h_hat)["relative_reconstruction_bias"]
    assert got == pytest.approx(brute_force_bias(h, h_hat), rel=1e-6)


def test_sae_metrics_errors_and_undefined_bias():
    h, z = torch.randn(5, 3), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="h_hat must have the shape of h"): sae_metrics(h, z, h[:3])
    with pytest.raises(ValueError, match="z must be a 2-D torch.Tensor"): sae_metrics(h, z[:, 0], h)
    with pytest.raises(ValueError, match="h must be a 2-D torch.Tensor"): sae_metrics(h.numpy(), z, h)
    assert math.isnan(sae_metrics(h, z, -h)["relative_reconstruction_bias"])
    assert math.isnan(sae_metrics(h, z, torch.zeros_like(h))["relative_reconstruction_bias"])


# ---------------------------------------------------------------------------------------------------------------
# train_sae and fit_posthoc_sae


def test_train_sae_higher_l1_gives_lower_l0_and_is_deterministic(h_dictionary):
    l0 = lambda sae: sae_metrics(h_dictionary, *sae(h_dictionary))["l0"]
    loose, tight = train_sae(h_dictionary, 64, 0.05, steps=300), train_sae(h_dictionary, 64, 1.0, steps=300)
    assert l0(loose) > l0(tight)
    again = train_sae(h_dictionary, 64, 1.0, steps=300)
    assert all(torch.equal(a, b) for a, b in zip(tight.state_dict().values(), again.state_dict().values()))
    assert not tight.training and not any(p.requires_grad for p in tight.parameters())
    assert isinstance(tight, SparseAutoencoder)


def test_train_sae_is_scale_free(h_dictionary):
    "Scaling h by c (with λ scaled by c) gives the same SAE up to rounding, with codes scaled by c."
    small, large = train_sae(h_dictionary, 32, 0.5, steps=100), train_sae(10 * h_dictionary, 32, 5.0, steps=100)
    z_small, z_large = small.encode(h_dictionary), large.encode(10 * h_dictionary)
    torch.testing.assert_close(z_large, 10 * z_small, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(large.decoder_weight, small.decoder_weight, rtol=1e-3, atol=1e-4)


def test_train_sae_leaves_global_rng_alone(h_dictionary):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_sae(h_dictionary, 8, 0.5, steps=2, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_fit_posthoc_sae_matches_target_on_dictionary_data(h_dictionary):
    sae, info = fit_posthoc_sae(h_dictionary, 64, target_l0=4)
    metrics = sae_metrics(h_dictionary, *sae(h_dictionary))
    assert info["matched"] and abs(metrics["l0"] - 4) <= 0.1 * 4
    assert metrics["l0"] == pytest.approx(info["l0"])
    assert metrics["explained_variance"] > 0.9
    assert info["rounds"] == len(info["history"]) and info["l1"] in [c for c, _ in info["history"]]
    rebuilt = train_sae(h_dictionary, 64, info["l1"])                     # the result is one plain fit at info['l1']
    assert torch.equal(rebuilt.decoder_weight, sae.decoder_weight)
    _, again = fit_posthoc_sae(h_dictionary, 64, target_l0=4)
    assert again["history"] == info["history"]


def test_fit_posthoc_sae_reports_an_unmatched_search(h_dictionary):
    sae, info = fit_posthoc_sae(h_dictionary, 64, target_l0=30, max_rounds=1, steps=50)
    assert info["rounds"] == 1 and not info["matched"]
    assert info["l0"] == pytest.approx(sae_metrics(h_dictionary, *sae(h_dictionary))["l0"])


def test_next_l1_steps():
    assert _next_l1([(1., 10.)], 5.) == pytest.approx(2.)                 # slope −1 before any is measured
    assert _next_l1([(1., 10.)], 9.) == pytest.approx(1.5)                # at least ×1.5
    assert _next_l1([(1., 10.)], 1e3) == pytest.approx(1 / 16)            # at most ×16
    assert _next_l1([(1., 20.), (2., 10.)], 5.) == pytest.approx(4.)      # secant through the last two rounds
    bracketed = _next_l1([(1., 10.), (4., 2.)], 5.)
    assert 1 * 4 ** 0.25 <= bracketed <= 1 * 4 ** 0.75                    # inside the bracket's middle half
    assert _next_l1([(1., 10.), (4., 0.)], 5.) == pytest.approx(2.)       # a silent end: geometric midpoint


def test_fit_posthoc_sae_errors(h_dictionary):
    with pytest.raises(ValueError, match="target_l0 must be"): fit_posthoc_sae(h_dictionary, 64, 0)
    with pytest.raises(ValueError, match="target_l0 must be"): fit_posthoc_sae(h_dictionary, 64, 65)
    with pytest.raises(ValueError, match="tolerance must be"): fit_posthoc_sae(h_dictionary, 64, 4, tolerance=0)
    with pytest.raises(ValueError, match="h_train must be a 2-D float"): fit_posthoc_sae(h_dictionary.numpy(), 64, 4)
    with pytest.raises(ValueError, match="h_train must vary"): fit_posthoc_sae(torch.ones(10, 3), 8, 2)
    with pytest.raises(ValueError, match="h_train contains non-finite"): train_sae(torch.full((4, 2), math.nan), 8, 1.)
    with pytest.raises(ValueError, match="width must be"): train_sae(h_dictionary, 0, 1.)


# ---------------------------------------------------------------------------------------------------------------
# replaced_pooled and sae_loss_recovered


def test_replaced_pooled_identity_is_exact_and_hook_is_removed(tiny_model):
    tasks = sample_tasks(32, "val", seed=0)
    tiny_model.eval()
    with torch.no_grad():
        plain = tiny_model.forward_batch(tasks)
        with replaced_pooled(tiny_model, lambda h: h): same = tiny_model.forward_batch(tasks)
        with replaced_pooled(tiny_model, lambda h: h + 1): shifted = tiny_model.forward_batch(tasks)
    assert torch.equal(same.logits, plain.logits)
    torch.testing.assert_close(shifted.h_cells, plain.h_cells + 1)
    assert len(tiny_model.bottleneck_in._forward_hooks) == 0
    with pytest.raises(ValueError, match="replace must return a tensor of shape"):
        with replaced_pooled(tiny_model, lambda h: h[:, :3]): tiny_model.forward_batch(tasks)
    assert len(tiny_model.bottleneck_in._forward_hooks) == 0               # removed after an error too
    with pytest.raises(TypeError, match="model must be a GridModel"):
        with replaced_pooled(torch.nn.Linear(2, 2), lambda h: h): pass


def test_sae_loss_recovered_anchors(tiny_model):
    tasks = sample_tasks(300, "val", seed=2)
    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    identity = sae_loss_recovered(tiny_model, tasks, sae=lambda h: h, batch_size=128)
    assert identity["reconstructed"] == identity["clean"]
    for name in ("accuracy", "iou", "loss"): assert identity["recovered"][name] == 1.0
    mean = identity["mean_h"]
    mean_only = sae_loss_recovered(tiny_model, tasks, sae=lambda h: mean.expand_as(h), batch_size=128)
    assert mean_only["reconstructed"] == mean_only["ablated"]
    for name in ("accuracy", "iou", "loss"): assert mean_only["recovered"][name] == 0.0
    assert tiny_model.training
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
    clean = evaluate(tiny_model, tasks, batch_size=128)
    assert identity["clean"] == clean                                      # the recording hook changes nothing
    with torch.no_grad(): h = tiny_model.eval().forward_batch(tasks).h
    torch.testing.assert_close(mean, h.mean(0), rtol=1e-5, atol=1e-6)


def test_sae_loss_recovered_accepts_saes(tiny_model):
    tasks = sample_tasks(200, "val", seed=3)
    default = sae_loss_recovered(tiny_model, tasks)
    explicit = sae_loss_recovered(tiny_model, tasks, sae=tiny_model.sae)
    assert default["reconstructed"] == explicit["reconstructed"]
    with torch.no_grad(): h = tiny_model.eval().forward_batch(sample_tasks(500, "train", seed=0)).h
    posthoc, _ = fit_posthoc_sae(h, 32, target_l0=4, steps=50, max_rounds=1)
    result = sae_loss_recovered(tiny_model, tasks, sae=posthoc)
    assert set(result) == {"clean", "reconstructed", "ablated", "recovered", "note", "mean_h"}
    assert set(result["recovered"]) == {"iou", "accuracy", "exact_match", "changed_accuracy", "loss"}
    with pytest.raises(TypeError, match="sae must be a SparseAutoencoder or a callable"):
        sae_loss_recovered(tiny_model, tasks, sae=3)


def test_recovered_formula_and_note():
    keys = ("iou", "accuracy", "exact_match", "changed_accuracy", "loss")
    clean = dict(zip(keys, (0.8, 0.9, 0.5, 0.6, 0.2)))
    ablated = dict(zip(keys, (0.4, 0.5, 0.5, 0.2, 1.0)))
    reconstructed = dict(zip(keys, (0.7, 0.6, 0.4, 0.4, 0.4)))
    recovered, note = _recovered(clean, reconstructed, ablated)
    assert recovered["iou"] == pytest.approx(0.75) and recovered["accuracy"] == pytest.approx(0.25)
    assert recovered["loss"] == pytest.approx(0.75)                         # (0.4 − 1.0)/(0.2 − 1.0)
    assert math.isnan(recovered["exact_match"]) and "exact_match" in note and "iou" not in note
    assert _recovered(clean, clean, ablated | {"exact_match": 0.0})[1] == ""


# ---------------------------------------------------------------------------------------------------------------
# unit_dashboard and plot_unit_dashboard


@pytest.fixture(scope="module")
def planted():
    tasks = sample_tasks(500, "train", seed=4)
    rng = np.random.default_rng(1)
    labels = tasks.multi_hot.numpy()
    z = np.maximum(rng.standard_normal((500, 10)) - 1.2, 0)
    z[:, 2] = np.maximum(3 * labels[:, 1] + 0.5 * rng.standard_normal(500) - 1, 0)   # a FLIP detector
    z[:, 6] = 0                                                                          # dead
    z[:, 8] = np.round(z[:, 8], 1)                                                       # ties
    return tasks, labels, z


def test_unit_dashboard_auroc_matches_pair_counts_and_mann_whitney(planted):
    tasks, labels, z = planted
    dashboard = unit_dashboard(torch.tensor(z), tasks, units=range(10))
    for card in dashboard["units"]:
        u = card["unit"]
        for j in range(6):
            assert card["auroc"][j] == pytest.approx(pair_count_auroc(z[:, u], labels[:, j]), abs=1e-12)
            y = labels[:, j] == 1
            statistic = scipy.stats.mannwhitneyu(z[y, u], z[~y, u]).statistic
            assert card["auroc"][j] == pytest.approx(statistic / (y.sum() * (~y).sum()), abs=1e-12)
    assert dashboard["auroc"].shape == (10, 6) and list(dashboard["alive"]) == [True] * 6 + [False] + [True] * 3


def test_unit_dashboard_default_selection_and_cards(planted):
    tasks, labels, z = planted
    dashboard = unit_dashboard(z, tasks, top=5, count=20, bins=7)
    units = [card["unit"] for card in dashboard["units"]]
    assert units[0] == 2 and 6 not in units and len(units) == 9            # the detector first; dead unit never
    best = [np.nanmax(dashboard["auroc"][u]) for u in units]
    assert best == sorted(best, reverse=True)
    card = dashboard["units"][0]
    assert card["top_inputs"].shape == card["top_outputs"].shape == (5, 8, 8)
    assert list(card["top_index"]) == list(np.argsort(-z[:, 2], kind="stable")[:5])
    assert all("FLIP" in text for text in card["top_programs"]) and all("FLIP" in c for c in card["top_compositions"])
    assert np.array_equal(card["top_outputs"][0], tasks.outputs[card["top_index"][0]].numpy())
    assert card["histogram_counts"].sum() == (z[:, 2] > 0).sum() and len(card["histogram_edges"]) == 8
    assert card["fraction_zero"] == pytest.approx((z[:, 2] == 0).mean())
    dead = unit_dashboard(z, tasks, units=[6])["units"][0]
    assert len(dead["top_index"]) == 0 and dead["fraction_zero"] == 1.0 and dead["histogram_counts"].sum() == 0


def test_unit_dashboard_errors(planted):
    tasks, _, z = planted
    with pytest.raises(ValueError, match="z has 3 rows but tasks has 500"): unit_dashboard(z[:3], tasks)
    with pytest.raises(ValueError, match="units entry must be"): unit_dashboard(z, tasks, units=[10])
    with pytest.raises(ValueError, match="top must be"): unit_dashboard(z, tasks, top=0)
    with pytest.raises(TypeError, match="tasks must be a TaskBatch"): unit_dashboard(z, None)
    with pytest.raises(ValueError, match="z contains non-finite"): unit_dashboard(np.full_like(z, np.nan), tasks)


def test_plot_unit_dashboard(planted):
    tasks, _, z = planted
    dashboard = unit_dashboard(z, tasks, top=4, count=3)
    figure = plot_unit_dashboard(dashboard, units=5)                       # only 3 units available
    assert isinstance(figure, matplotlib.figure.Figure) and len(figure.axes) == 9
    assert figure.axes[0].get_title(loc="left").startswith("unit 2")
    heights = [patch.get_height() for patch in figure.axes[2].patches]
    assert heights == pytest.approx(list(np.nan_to_num(dashboard["units"][0]["auroc"], nan=0.5)))
    with pytest.raises(ValueError, match="units must be"): plot_unit_dashboard(dashboard, units=0)
    with pytest.raises(ValueError, match="dashboard has no units"): plot_unit_dashboard(dict(dashboard, units=[]))
    matplotlib.pyplot.close("all")
