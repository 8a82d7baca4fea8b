"""Property and reference tests of so8lab.cka (SPEC §8, H4 analysis).

References are written here independently of the module: HSIC with an explicit centring matrix, the unbiased
HSIC_1 of Song et al. (2012) with explicit matrices (itself checked against its U-statistic definition over
ordered 4-tuples), explicit projectors for chordal distances, brute-force pair counting for AUROC, scipy's
L-BFGS-B for probes, full enumeration of permutations for p-values, and a hand-written Benjamini-Hochberg."""
import itertools
import re
import numpy as np
from reference import hsic_unbiased_textbook
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings, strategies as st

from so8lab.cka import (StreamingCKA, SubspaceDistance, LinearProbe, auroc, cka_matrix, grassmann_distance,
                        linear_cka, plot_cka_matrix, principal_angles, probe_transfer, train_probe, unit_statistics)

# ---------------------------------------------------------------------------------------------------------------
# Textbook references (float64)


def hsic_textbook(K, L):
    "Biased HSIC tr(KHLH)/(n-1)^2 with an explicit centring matrix H."
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2




def hsic_u_statistic(K, L):
    "HSIC as a U-statistic: mean over ordered distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(len(K)), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    return total / count


def cka_textbook(X, Y, debiased=False):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    K, L = X @ X.T, Y @ Y.T
    hsic = hsic_unbiased_textbook if debiased else hsic_textbook
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def correlated_pair(rng, n, dx, dy):
    X = rng.standard_normal((n, dx))
    Y = np.tanh(X @ rng.standard_normal((dx, dy))) + rng.standard_normal((n, dy))
    return X, Y


def antithetic(rng, rows, d, scale=1.0):
    "Rows quantised to 2^-10 in +/- pairs: the column means are exactly zero, and 1024 + value is exact in float32."
    half = np.round(scale * rng.standard_normal((rows // 2, d)) * 1024) / 1024
    return np.vstack([half, -half])


def benjamini_hochberg(p):
    order = np.argsort(p)
    scaled = np.asarray(p)[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.empty(len(p))
    q[order] = np.minimum(1, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


seeds = st.integers(0, 2**32 - 1)

# ---------------------------------------------------------------------------------------------------------------
# HSIC / CKA


@pytest.mark.parametrize("n", [5, 6, 7])
def test_unbiased_hsic_formula_is_the_u_statistic(n):
    rng = np.random.default_rng(n)
    X, Y = rng.standard_normal((n, 3)) + 2, rng.standard_normal((n, 2))
    K, L = X @ X.T, Y @ Y.T
    assert hsic_unbiased_textbook(K, L) == pytest.approx(hsic_u_statistic(K, L), rel=1e-12, abs=1e-13)


@given(seed=seeds, n=st.integers(8, 40), dx=st.integers(1, 60), dy=st.integers(1, 60),
       debiased=st.booleans(), as_torch=st.booleans())
def test_linear_cka_matches_textbook(seed, n, dx, dy, debiased, as_torch):
    rng = np.random.default_rng(seed)
    X, Y = correlated_pair(rng, n, dx, dy)
    expected = cka_textbook(X, Y, debiased)
    if as_torch: X, Y = torch.tensor(X), torch.tensor(Y)
    result = linear_cka(X, Y, debiased=debiased)
    assert isinstance(result, float)
    assert abs(result - expected) < 1e-10


@given(seed=seeds, n=st.integers(8, 40), d=st.integers(1, 50), debiased=st.booleans())
def test_self_similarity_is_one(seed, n, d, debiased):
    X = np.random.default_rng(seed).standard_normal((n, d))
    assert abs(linear_cka(X, X, debiased) - 1) < 1e-12


@given(seed=seeds, n=st.integers(8, 40), dx=st.integers(1, 30), dy=st.integers(1, 30), debiased=st.booleans(),
       scale=st.floats(1e-3, 1e3), offset=st.floats(-100, 100))
def test_invariances(seed, n, dx, dy, debiased, scale, offset):
    rng = np.random.default_rng(seed)
    X, Y = correlated_pair(rng, n, dx, dy)
    reference = cka_textbook(X, Y, debiased)
    shift = offset * rng.standard_normal(dx)
    assert abs(linear_cka(scale * X, Y, debiased) - reference) < 1e-10
    assert abs(linear_cka(X @ random_orthogonal(rng, dx), Y @ random_orthogonal(rng, dy), debiased) - reference) < 1e-10
    assert abs(linear_cka(X + shift, Y, debiased) - reference) < 1e-9


def test_float32_offset_features_stay_accurate():
    rng = np.random.default_rng(0)
    Zx = antithetic(rng, 200, 16)
    Zy = np.round(Zx @ rng.standard_normal((16, 16)) * 256) / 1024 + antithetic(rng, 200, 16)
    X, Y = torch.tensor(1024 + Zx, dtype=torch.float32), torch.tensor(1024 + Zy, dtype=torch.float32)
    assert np.array_equal(X.double().numpy() - 1024, Zx)
    exact = cka_textbook(Zx, Zy)
    assert abs(linear_cka(X, Y) - exact) < 1e-12
    assert abs(linear_cka(X, Y, debiased=True) - cka_textbook(Zx, Zy, True)) < 1e-12
    H = torch.eye(200) - 1 / 200
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    naive = float((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum()))
    assert abs(naive - exact) > 1e-2


def test_debiased_removes_small_sample_inflation():
    rng = np.random.default_rng(1)
    draws = [(rng.standard_normal((20, 64)), rng.standard_normal((20, 64))) for _ in range(30)]
    assert np.mean([linear_cka(A, B) for A, B in draws]) > 0.6
    assert abs(np.mean([linear_cka(A, B, debiased=True) for A, B in draws])) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Streaming


@settings(max_examples=40)
@given(seed=seeds, n=st.integers(8, 120), dx=st.integers(1, 20), dy=st.integers(1, 20), debiased=st.booleans(),
       cuts=st.lists(st.floats(0, 1), max_size=6), offset=st.sampled_from([0.0, 1.0, 1000.0]))
def test_streaming_exact_matches_full_sample(seed, n, dx, dy, debiased, cuts, offset):
    rng = np.random.default_rng(seed)
    n -= n % 2
    Zx = antithetic(rng, n, dx, scale=2.0)
    Zy = np.round(np.tanh(Zx @ rng.standard_normal((dx, dy))) * 1024) / 1024 + antithetic(rng, n, dy)
    boundaries = sorted({int(c * n) for c in cuts} - {0, n})
    stream = StreamingCKA(debiased=debiased)
    for rows in np.split(np.arange(n), boundaries):
        stream.update(offset + Zx[rows], torch.tensor(offset + Zy[rows]))
    assert stream.n == n and stream.batches == len(boundaries) + 1
    assert abs(stream.compute() - cka_textbook(Zx, Zy, debiased)) < 1e-10


def test_streaming_minibatch_is_ratio_of_mean_unbiased_hsic():
    rng = np.random.default_rng(2)
    X, Y = correlated_pair(rng, 300, 10, 7)
    stream = StreamingCKA(debiased=True, mode="minibatch")
    sums = np.zeros(3)
    for rows in np.split(np.arange(300), [50, 130, 200]):
        stream.update(X[rows], Y[rows])
        K, L = X[rows] @ X[rows].T, Y[rows] @ Y[rows].T
        sums += [hsic_unbiased_textbook(K, L), hsic_unbiased_textbook(K, K), hsic_unbiased_textbook(L, L)]
    assert abs(stream.compute() - sums[0] / np.sqrt(sums[1] * sums[2])) < 1e-10
    single = StreamingCKA(debiased=True, mode="minibatch").update(X, Y)
    assert abs(single.compute() - cka_textbook(X, Y, True)) < 1e-10


def test_streaming_minibatch_matches_full_sample_debiased_in_expectation():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5000, 64))
    Y = 0.3 * X @ rng.standard_normal((64, 64)) / 8 + rng.standard_normal((5000, 64))
    stream = StreamingCKA(debiased=True, mode="minibatch")
    for rows in np.split(np.arange(5000), 50): stream.update(X[rows], Y[rows])
    assert abs(stream.compute() - linear_cka(X, Y, debiased=True)) < 0.02


# ---------------------------------------------------------------------------------------------------------------
# Matrices and plots


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_matches_textbook(debiased):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((80, 20))
    reps_a = {"a": base[:, :5], "b": base @ rng.standard_normal((20, 100))}      # d < n and d >= n
    reps_b = [base[:, 3:9] + rng.standard_normal((80, 6)), rng.standard_normal((80, 3))]
    table = cka_matrix(reps_a, reps_b, debiased=debiased)
    assert list(table.index) == ["a", "b"] and list(table.columns) == [0, 1]
    for (i, A), (j, B) in itertools.product(reps_a.items(), enumerate(reps_b)):
        assert abs(table.loc[i, j] - cka_textbook(A, B, debiased)) < 1e-10


def test_plot_cka_matrix_returns_figure():
    from matplotlib.figure import Figure
    table = cka_matrix({"x": np.eye(6)[:, :3] + np.arange(6)[:, None]}, [np.arange(12.).reshape(6, 2) ** 2])
    figure = plot_cka_matrix(table, title="t")
    assert isinstance(figure, Figure) and figure.axes[0].get_title() == "t"
    assert [t.get_text() for t in figure.axes[0].texts] == [f"{table.iloc[0, 0]:.2f}"]


# ---------------------------------------------------------------------------------------------------------------
# Principal angles and Grassmann distances


@given(seed=seeds, angles=st.lists(st.one_of(st.floats(1e-12, 1e-4), st.floats(1e-4, np.pi / 2)), min_size=1, max_size=4),
       extra=st.integers(0, 3))
def test_principal_angles_recover_planted_angles(seed, angles, extra):
    rng = np.random.default_rng(seed)
    k = len(angles)
    planted = np.sort(angles)
    d = 2 * k + extra
    E, R = np.eye(d), random_orthogonal(rng, d)
    U = R @ E[:, :k]
    V = R @ (E[:, :k] * np.cos(planted) + E[:, k:2 * k] * np.sin(planted))
    result = principal_angles(U, V)
    assert np.all(np.abs(result - planted) <= 1e-14 + 1e-6 * planted)     # relative accuracy even at 1e-12
    assert np.allclose(principal_angles(V, U), result, rtol=1e-6, atol=1e-14)


@given(seed=seeds, d=st.integers(3, 12), p=st.integers(1, 3), q=st.integers(1, 3))
def test_principal_angles_match_scipy_on_generic_subspaces(seed, d, p, q):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((d, p)))[0]
    V = np.linalg.qr(rng.standard_normal((d, q)))[0]
    ours = principal_angles(U, V)
    assert len(ours) == min(p, q)
    # scipy uses arccos for the smallest angle in some cases; compare where that is accurate (cos^2 well below 1)
    reference = np.sort(scipy.linalg.subspace_angles(U, V))
    big = reference > 1e-3
    assert np.allclose(ours[big], reference[big], atol=1e-9)


def test_arccos_loses_tiny_angles():
    U, V = np.eye(3)[:, :1], np.array([[np.cos(1e-8)], [np.sin(1e-8)], [0.0]])
    assert abs(principal_angles(U, V)[0] - 1e-8) < 1e-20
    assert abs(np.arccos(min(1.0, (U.T @ V).item())) - 1e-8) > 0.4e-8


@settings(max_examples=40)
@given(seed=seeds, d=st.integers(3, 9), k=st.integers(1, 2), kind=st.sampled_from(["geodesic", "chordal"]))
def test_grassmann_distance_is_a_metric(seed, d, k, kind):
    rng = np.random.default_rng(seed)
    data = [rng.standard_normal((30, d)) * np.linspace(4, 1, d) @ random_orthogonal(rng, d) for _ in range(3)]
    D = np.array([[grassmann_distance(A, B, k, kind).distance for B in data] for A in data])
    assert np.allclose(D, D.T, atol=1e-12) and np.allclose(np.diag(D), 0, atol=1e-12)
    for i, j, m in itertools.product(range(3), repeat=3):
        assert D[i, j] <= D[i, m] + D[m, j] + 1e-12
    assert D.max() <= (np.pi / 2 if kind == "geodesic" else 1.0) * np.sqrt(k) + 1e-12


@given(seed=seeds, d=st.integers(3, 10), k=st.integers(1, 3))
def test_chordal_distance_equals_projector_distance(seed, d, k):
    rng = np.random.default_rng(seed)
    k = min(k, d - 1)
    X, Y = rng.standard_normal((25, d)), rng.standard_normal((40, d)) + 5
    result = grassmann_distance(X, Y, k, kind="chordal")
    U = np.linalg.svd(X - X.mean(0))[2][:k].T
    V = np.linalg.svd(Y - Y.mean(0))[2][:k].T
    assert abs(result.distance - np.linalg.norm(U @ U.T - V @ V.T) / np.sqrt(2)) < 1e-10
    assert isinstance(result, SubspaceDistance) and result.kind == "chordal" and len(result.angles) == k


def test_grassmann_planted_subspace_distance_and_eigengap():
    rng = np.random.default_rng(5)
    d, k, n = 10, 3, 120
    planted = np.array([0.05, 0.4, 1.1])
    E, R = np.eye(d), random_orthogonal(rng, d)
    U = R @ E[:, :k]
    V = R @ (E[:, :k] * np.cos(planted) + E[:, k:2 * k] * np.sin(planted))
    spectrum = np.array([10., 9, 8, 2, 1.5, 1, 0.8, 0.6, 0.4, 0.2])

    def data(basis):
        W = np.linalg.qr(np.hstack([basis, rng.standard_normal((d, d - k))]))[0]
        W[:, :k] = basis
        Q = np.linalg.qr(antithetic(rng, n, d))[0]
        return Q * spectrum @ W.T

    result = grassmann_distance(data(U) + 3, data(V), k)
    assert abs(result.distance - np.linalg.norm(planted)) < 1e-12
    assert abs(result.eigengap_x - 6 / np.sqrt(n - 1)) < 1e-12 and abs(result.eigengap_y - 6 / np.sqrt(n - 1)) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# AUROC and probes


@given(seed=seeds, n=st.integers(2, 40), levels=st.integers(2, 6))
def test_auroc_matches_pair_counting(seed, n, levels):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(float)          # many ties
    labels = rng.integers(0, 2, n).astype(float)
    result = auroc(scores, labels)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        assert np.isnan(result)
    else:
        pairs = [(a > b) + 0.5 * (a == b) for a in positives for b in negatives]
        assert abs(result - np.mean(pairs)) < 1e-12


def test_probe_matches_scipy_reference():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((300, 5)) * [1, 2, 3, 4, 5] + 20
    centred = features - features.mean(0)
    labels = (centred @ rng.standard_normal((5, 2)) + 3 * rng.standard_normal((300, 2)) > 0).astype(float)
    z = (features - features.mean(0)) / np.sqrt(features.var(0, ddof=1).mean())

    def objective(theta, y):
        w, b = theta[:-1], theta[-1]
        logits = z @ w + b
        residual = (scipy.special.expit(logits) - y) / len(z)
        loss = np.sum(np.logaddexp(0, logits) - y * logits) / len(z) + 0.05 / 2 * w @ w
        return loss, np.append(z.T @ residual + 0.05 * w, residual.sum())

    probe = train_probe(torch.tensor(features), labels, weight_decay=0.05)
    assert isinstance(probe, LinearProbe)
    for column, y in enumerate(labels.T):
        fit = scipy.optimize.minimize(objective, np.zeros(6), args=(y,), jac=True, method="L-BFGS-B",
                                      options=dict(gtol=1e-12, ftol=1e-15, maxiter=5000)).x
        assert np.allclose(probe.weight[column].numpy(), fit[:-1], atol=1e-6)
        assert abs(probe.bias[column].item() - fit[-1]) < 1e-6
    reference = scipy.special.expit(z @ probe.weight.numpy().T + probe.bias.numpy())
    assert np.allclose(probe.predict_proba(features), reference, atol=1e-12)


def test_probe_is_deterministic():
    rng = np.random.default_rng(7)
    features, labels = rng.standard_normal((200, 8)), (rng.random((200, 6)) < 0.5).astype(float)
    first, second = train_probe(features, labels, seed=3), train_probe(features, labels, seed=3)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


@pytest.mark.parametrize("shared", [True, False])
def test_probe_transfer_needs_a_shared_direction(shared):
    rng = np.random.default_rng(8)
    basis = random_orthogonal(rng, 32).T

    def group(signal, nuisance):
        labels = (rng.random((2000, 6)) < 0.3).astype(float)
        return labels @ signal + rng.standard_normal((2000, 4)) @ nuisance + 0.5 * rng.standard_normal((2000, 32)), labels

    features_a, labels_a = group(2 * basis[:6], 3 * basis[12:16])
    features_b, labels_b = group(2 * (basis[:6] if shared else basis[6:12]), 3 * basis[16:20])
    table = probe_transfer(features_a, labels_a, features_b, labels_b, label_names=list("abcdef"))
    assert list(table.index) == list("abcdef")
    assert table.auroc_a.min() > 0.95
    if shared: assert table.auroc_b.min() > 0.95 and table.accuracy_b.min() > 0.9
    else: assert abs(table.auroc_b.mean() - 0.5) < 0.03 and np.abs(table.auroc_b - 0.5).max() < 0.1


# ---------------------------------------------------------------------------------------------------------------
# Sparse-unit statistics


def test_unit_statistics_p_values_match_full_enumeration():
    rng = np.random.default_rng(9)
    units = rng.standard_normal((7, 3))
    units[:, 2] = np.maximum(units[:, 2], 0)        # a sparse unit with ties at 0
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [0, 1], [1, 1]], float)
    table = unit_statistics(units, labels, n_permutations=20000, seed=1)
    permutations = np.array(list(itertools.permutations(range(7))))          # all 5040
    for row in table.itertuples():
        z, y = units[:, row.unit], labels[:, row.label]
        every = y[permutations]                                              # [5040, 7] permuted label columns
        # correlation: textbook Pearson on every permutation; AUROC: pair counting with ties as 1/2
        correlation = [np.corrcoef(z, yy)[0, 1] for yy in every]
        wins = (z[:, None] > z[None, :]) + 0.5 * (z[:, None] == z[None, :])
        area = np.einsum("pi,ij,pj->p", every, wins, 1 - every) / (y.sum() * (7 - y.sum()))
        assert abs(row.correlation - correlation[0]) < 1e-12 and abs(row.auroc - area[0]) < 1e-12
        exact_correlation = np.mean(np.abs(correlation) >= abs(correlation[0]) - 1e-12)
        exact_auroc = np.mean(np.abs(area - 0.5) >= abs(area[0] - 0.5) - 1e-12)
        assert abs(row.p_correlation - exact_correlation) < 0.015          # Monte Carlo error <= 0.0036 (sd)
        assert abs(row.p_auroc - exact_auroc) < 0.015


def test_unit_statistics_p_values_uniform_under_the_null():
    rng = np.random.default_rng(10)
    labels = (rng.random((200, 6)) < 0.3).astype(float)
    table = unit_statistics(np.maximum(rng.standard_normal((200, 200)) - 0.5, 0), labels, n_permutations=999, seed=2)
    for column in ("p_correlation", "p_auroc"):
        p = table[column].to_numpy()
        assert 0.03 <= (p <= 0.05).mean() <= 0.075                           # 1,200 tests: sd of the fraction 0.006
        assert scipy.stats.kstest(p, "uniform").statistic < 0.05


def test_unit_statistics_planted_unit_survives_fdr():
    rng = np.random.default_rng(12)
    labels = (rng.random((300, 6)) < 0.3).astype(float)
    codes = np.maximum(rng.standard_normal((300, 40)) - 0.5, 0)
    codes[:, 5] = np.maximum(1.5 * labels[:, 4] + rng.standard_normal(300) - 1, 0)
    codes[:, 7] = 0
    table = unit_statistics(torch.tensor(codes), torch.tensor(labels), n_permutations=9999, seed=2)
    assert table.loc[table.unit == 7, "dead"].all() and table.loc[table.unit == 7, "p_auroc"].isna().all()
    assert np.allclose(table.activation_rate.to_numpy()[::6], (codes > 0).mean(0))
    tested = table[~table.dead]
    for column in ("correlation", "auroc"):
        assert np.allclose(tested[f"q_{column}"], benjamini_hochberg(tested[f"p_{column}"].to_numpy()), atol=1e-12)
        planted = tested[(tested.unit == 5) & (tested.label == 4)].iloc[0]
        assert planted[f"p_{column}"] == 1 / 10000 and planted[f"q_{column}"] < 0.05


def test_unit_statistics_is_seeded():
    rng = np.random.default_rng(11)
    codes, labels = np.maximum(rng.standard_normal((50, 4)), 0), (rng.random((50, 6)) < 0.5).astype(float)
    first, second = unit_statistics(codes, labels, n_permutations=300, seed=4), unit_statistics(codes, labels, n_permutations=300, seed=4)
    assert first.equals(second)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call, error, message", [
    (lambda: linear_cka([[1.0]], np.ones((1, 1))), TypeError, "X must be a torch.Tensor"),
    (lambda: linear_cka(np.ones(5), np.ones((5, 1))), ValueError, "X must be 2-D"),
    (lambda: linear_cka(np.random.rand(5, 2), np.random.rand(6, 2)), ValueError, "same number of samples"),
    (lambda: linear_cka(np.random.rand(3, 2), np.random.rand(3, 2), debiased=True), ValueError, "at least 4 samples"),
    (lambda: linear_cka(np.ones((5, 2)), np.random.rand(5, 2)), ValueError, "X has no variance"),
    (lambda: StreamingCKA(mode="minibatch"), ValueError, "debiased=True"),
    (lambda: cka_matrix(np.ones((3, 3))), TypeError, "reps_a must be a dict or list"),
    (lambda: principal_angles(np.ones((3, 1)), np.eye(3)[:, :1]), ValueError, "U must have orthonormal columns"),
    (lambda: grassmann_distance(np.random.rand(9, 4), np.random.rand(9, 4), 5), ValueError,
     "k for X must be an integer in 1..4, got 5"),
    (lambda: grassmann_distance(np.random.rand(9, 4), np.random.rand(9, 4), 2, "arc"), ValueError,
     "kind must be one of ['geodesic', 'chordal'], got 'arc'"),
    (lambda: train_probe(np.random.rand(5, 2), np.array([0, 1, 2, 0, 1])), ValueError, "labels must be binary"),
    (lambda: probe_transfer(np.random.rand(6, 2), np.eye(6)[:, :2], np.random.rand(6, 2), np.eye(6)[:, :3]),
     ValueError, "same labels"),
    (lambda: unit_statistics(np.random.rand(6, 2), np.eye(6)[:, :2], n_permutations=0), ValueError, "n_permutations"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=re.escape(message)): call()
