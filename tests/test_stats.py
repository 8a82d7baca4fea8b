"""Tests of so8lab.stats against independent references: float64 formulas, brute-force loops, hand-worked examples,
and simulations whose answer is known."""
import dataclasses
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats as scipy_stats

from so8lab.stats import (Comparison, Verdict, bootstrap_ci, cohens_d, cohens_dz, compare, comparison_table,
                          difference_ci, hedges_correction, hedges_g, holm, markdown_table, plot_comparison, verdict)


# ---------------------------------------------------------------- Holm
def holm_reference(pvalues):
    "Holm adjusted p-values by the textbook definition, with explicit loops (no numpy tricks)."
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    for rank, i in enumerate(order):
        adjusted[i] = min(1.0, max((m - j) * pvalues[order[j]] for j in range(rank + 1)))
    return adjusted


def holm_rejects(pvalues, alpha):
    "Holm's step-down procedure run literally: which hypotheses are rejected at level alpha."
    m = len(pvalues)
    rejected = [False] * m
    for step, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        if pvalues[i] > alpha / (m - step): break
        rejected[i] = True
    return rejected


def test_holm_hand_worked():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # Bonferroni cap: a single p stays; 3 x 0.5 caps at 1
    np.testing.assert_allclose(holm([0.2]), [0.2])
    np.testing.assert_allclose(holm([0.5, 0.5, 0.5]), [1.0, 1.0, 1.0])


def test_holm_ties_and_nan():
    np.testing.assert_allclose(holm([0.01, 0.01, 0.5]), [0.03, 0.03, 0.5])
    adjusted = holm([np.nan, 0.01, 0.02])
    assert np.isnan(adjusted[0])
    np.testing.assert_allclose(adjusted[1:], [0.02, 0.02])   # NaN is left out: family of 2


p_lists = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=12)


@given(p_lists)
@settings(max_examples=300, deadline=None)
def test_holm_matches_loop_reference(pvalues):
    np.testing.assert_allclose(holm(pvalues), holm_reference(pvalues), rtol=1e-12, atol=0)


@given(p_lists, st.floats(0.001, 0.2))
@settings(max_examples=300, deadline=None)
def test_holm_adjusted_below_alpha_iff_step_down_rejects(pvalues, alpha):
    adjusted = holm(pvalues)
    # exact ties at the boundary are measure-zero; skip them rather than fight rounding
    scaled = [p * k for p in pvalues for k in range(1, len(pvalues) + 1)]
    if any(abs(s - alpha) < 1e-12 for s in scaled): return
    assert list(adjusted <= alpha) == holm_rejects(pvalues, alpha)


@given(p_lists)
@settings(max_examples=200, deadline=None)
def test_holm_properties(pvalues):
    p, adjusted = np.array(pvalues), holm(pvalues)
    assert (adjusted >= p - 1e-15).all() and (adjusted <= 1).all()
    order = np.argsort(p, kind="stable")
    assert (np.diff(adjusted[order]) >= -1e-15).all()          # monotone in the raw p-values
    permutation = np.random.default_rng(len(pvalues)).permutation(len(pvalues))
    np.testing.assert_allclose(holm(p[permutation]), adjusted[permutation])


@pytest.mark.parametrize("bad", [[0.1, -0.01], [1.2], [[0.1, 0.2]]])
def test_holm_bad_input(bad):
    with pytest.raises(ValueError, match="pvalues"): holm(bad)


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_and_contains_mean():
    values = np.random.default_rng(0).normal(size=8)
    first, second = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert first == second
    assert first[1] < first[0] < first[2]
    assert bootstrap_ci(values, seed=4) != first
    assert first[0] == pytest.approx(math.fsum(values) / len(values))


def test_bootstrap_close_to_normal_theory_for_large_samples():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    mean, low, high = bootstrap_ci(values, n_resamples=4999, seed=0)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(mean - half, abs=0.1 * half)
    assert high == pytest.approx(mean + half, abs=0.1 * half)


def test_bootstrap_small_samples_documented():
    mean, low, high = bootstrap_ci([2.5])
    assert mean == 2.5 and math.isnan(low) and math.isnan(high)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    mean, low, high = bootstrap_ci([1.0, 2.0])
    assert (mean, low, high) == (1.5, 1.0, 2.0)                # two values: [min, max]


def test_bootstrap_coverage_on_normal_data():
    rng = np.random.default_rng(123)
    covered = [low <= 1.0 <= high for _, low, high in
               (bootstrap_ci(rng.normal(1.0, 0.5, 40), n_resamples=999, seed=i) for i in range(400))]
    assert 0.91 <= np.mean(covered) <= 0.98


def test_difference_ci_paired_equals_one_sample_on_differences():
    rng = np.random.default_rng(2)
    treatment, baseline = rng.normal(1, 1, 12), rng.normal(0, 1, 12)
    assert difference_ci(treatment, baseline, paired=True, seed=5) == bootstrap_ci(treatment - baseline, seed=5)
    difference, low, high = difference_ci(treatment, baseline, paired=False, seed=5)
    assert difference == pytest.approx(treatment.mean() - baseline.mean()) and low < difference < high


@pytest.mark.parametrize("call, message", [
    (lambda: bootstrap_ci([]), "values is empty"),
    (lambda: bootstrap_ci([1.0, float("nan")]), "values contains 1 NaN"),
    (lambda: bootstrap_ci([1.0, float("inf")]), "values contains 1 NaN or infinite"),
    (lambda: bootstrap_ci(np.ones((2, 3))), "values must be 1-D"),
    (lambda: bootstrap_ci([1.0, 2.0], confidence=1.0), "confidence must be a finite number in"),
    (lambda: bootstrap_ci([1.0, 2.0], n_resamples=-5), "n_resamples must be"),
])
def test_bootstrap_bad_input(call, message):
    with pytest.raises(ValueError, match=message): call()


# ---------------------------------------------------------------- effect sizes
def cohens_d_reference(x, y):
    nx, ny = len(x), len(y)
    mx, my = math.fsum(x) / nx, math.fsum(y) / ny
    pooled = (math.fsum((v - mx) ** 2 for v in x) + math.fsum((v - my) ** 2 for v in y)) / (nx + ny - 2)
    return (mx - my) / math.sqrt(pooled)


samples = st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=15)


@given(samples, samples)
@settings(max_examples=200, deadline=None)
def test_cohens_d_matches_formula(x, y):
    reference_spread = np.var(x) * len(x) + np.var(y) * len(y)
    if reference_spread < 1e-6: return                       # zero-spread case tested separately
    assert cohens_d(x, y) == pytest.approx(cohens_d_reference(x, y), rel=1e-9, abs=1e-9)
    assert cohens_d(y, x) == pytest.approx(-cohens_d(x, y), rel=1e-12, abs=1e-12)


def test_cohens_d_hand_worked_and_zero_spread():
    assert cohens_d([3.0, 4.0, 5.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert cohens_d([2.0, 2.0], [2.0, 2.0]) == 0.0
    assert cohens_d([1.0, 1.0], [2.0, 2.0]) == -math.inf


def test_hedges_correction_against_gamma_formula_and_approximation():
    for dof in range(2, 60):
        exact = math.gamma(dof / 2) / (math.sqrt(dof / 2) * math.gamma((dof - 1) / 2))
        assert hedges_correction(dof) == pytest.approx(exact, rel=1e-12)
        if dof >= 8: assert hedges_correction(dof) == pytest.approx(1 - 3 / (4 * dof - 1), abs=1e-3)
    x, y = [1.0, 2.0, 4.0, 7.0], [0.0, 1.0, 1.5]
    assert hedges_g(x, y) == pytest.approx(hedges_correction(5) * cohens_d_reference(x, y))


def test_hedges_g_is_less_biased_than_d():
    rng = np.random.default_rng(9)                  # true effect 1.0, 5 + 5 seeds
    draws = [(rng.normal(1, 1, 5), rng.normal(0, 1, 5)) for _ in range(4000)]
    mean_d = np.mean([cohens_d(x, y) for x, y in draws])
    mean_g = np.mean([hedges_g(x, y) for x, y in draws])
    assert abs(mean_g - 1.0) < 0.05 < mean_d - 1.0


def test_cohens_dz_hand_worked():
    # differences 1, 2, 3, 6: mean 3, SD sqrt(((-2)^2 + 1 + 0 + 9) / 3) = sqrt(14/3)
    assert cohens_dz([2.0, 4.0, 6.0, 10.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(3 / math.sqrt(14 / 3))
    with pytest.raises(ValueError, match="cohens_dz needs at least 2 pairs"): cohens_dz([1.0], [0.0])
    with pytest.raises(ValueError, match="equal length"): cohens_dz([1.0, 2.0], [0.0])


# ---------------------------------------------------------------- compare: Welch vs paired
def welch_reference(x, y):
    nx, ny = len(x), len(y)
    vx, vy = np.var(x, ddof=1) / nx, np.var(y, ddof=1) / ny
    t = (np.mean(x) - np.mean(y)) / math.sqrt(vx + vy)
    dof = (vx + vy) ** 2 / (vx ** 2 / (nx - 1) + vy ** 2 / (ny - 1))
    return t, dof


def test_welch_when_independent_even_with_unequal_lengths_and_variances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(1.0, 0.2, 7), rng.normal(0.8, 1.0, 12)
    result = compare(x, y, paired=False)
    t, dof = welch_reference(x, y)
    assert result.test == "Welch t" and result.effect_name == "hedges_g"
    assert result.statistic == pytest.approx(t)
    assert result.p_value == pytest.approx(scipy_stats.t.sf(t, dof))
    two_sided = compare(x, y, paired=False, alternative="two-sided")
    assert two_sided.p_value == pytest.approx(2 * scipy_stats.t.sf(abs(t), dof))
    less = compare(x, y, paired=False, alternative="less")
    assert less.p_value == pytest.approx(scipy_stats.t.cdf(t, dof))


def test_paired_t_when_paired():
    rng = np.random.default_rng(5)
    x = rng.normal(size=8)
    y = x - 0.3 + rng.normal(0, 0.1, 8)
    result = compare(x, y, paired=True)
    d = x - y
    t = d.mean() / (d.std(ddof=1) / math.sqrt(8))
    assert result.test == "paired t" and result.effect_name == "d_z"
    assert result.statistic == pytest.approx(t)
    assert result.p_value == pytest.approx(scipy_stats.t.sf(t, 7))
    assert result.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    assert result.difference == pytest.approx(d.mean())
    assert result.difference_ci[0] < result.difference < result.difference_ci[1]
    assert list(result.treatment) == list(x) and list(result.baseline) == list(y)


def test_pairing_gains_power_with_shared_seed_noise():
    rng = np.random.default_rng(6)
    seed_noise = rng.normal(0, 1.0, 10)
    x, y = seed_noise + 0.3 + rng.normal(0, 0.05, 10), seed_noise + rng.normal(0, 0.05, 10)
    assert compare(x, y, paired=True).p_value < 1e-6
    assert compare(x, y, paired=False).p_value > 0.1


def test_nonparametric_exact_p_values():
    # five positive differences: exact one-sided signed-rank p = 2^-5; complete separation 6 vs 4: 1 / C(10, 4)
    assert compare([2.0, 3.0, 4.0, 5.0, 6.0], [1.0] * 5, paired=True, nonparametric=True).p_value == pytest.approx(1 / 32)
    result = compare([10.0, 11.0, 12.0, 13.0, 14.0, 15.0], [0.0, 1.0, 2.0, 3.0], paired=False, nonparametric=True)
    assert result.test == "Mann-Whitney U" and result.p_value == pytest.approx(1 / math.comb(10, 4))


def test_compare_deterministic_and_json_ready():
    import json
    x, y = [0.7, 0.72, 0.69, 0.75], [0.6, 0.65, 0.61, 0.66]
    first, second = compare(x, y, paired=True, seed=1), compare(x, y, paired=True, seed=1)
    assert first.to_dict() == second.to_dict()
    record = json.loads(json.dumps(first.to_dict()))
    assert record["treatment"] == x and record["test"] == "paired t" and len(record["difference_ci"]) == 2


@pytest.mark.parametrize("call, error, message", [
    (lambda: compare([], [1.0, 2.0], paired=False), ValueError, "treatment is empty"),
    (lambda: compare([1.0, 2.0], [], paired=False), ValueError, "baseline is empty"),
    (lambda: compare([1.0, float("nan")], [1.0, 2.0], paired=False), ValueError, "treatment contains 1 NaN"),
    (lambda: compare([1.0, 2.0], [float("nan"), 2.0], paired=True), ValueError, "baseline contains 1 NaN"),
    (lambda: compare([1.0, 2.0, 3.0], [1.0, 2.0], paired=True), ValueError, "paired=True needs treatment and baseline of equal length"),
    (lambda: compare([1.0, 2.0], [1.0, 2.0], paired=False, alternative="up"), ValueError, "alternative must be one of"),
    (lambda: compare([1.0], [1.0, 2.0], paired=False), ValueError, "at least 2 seeds"),
    (lambda: compare([1.0, 2.0], [1.0, 2.0], paired=False, confidence=0), ValueError, "confidence must be a finite number in"),
    (lambda: compare([1.0, 2.0], [1.0, 2.0], paired=None), TypeError, "paired must be True or False"),
    (lambda: compare(["a", "b"], [1.0, 2.0], paired=False), TypeError, "treatment must be numbers"),
])
def test_compare_bad_input(call, error, message):
    with pytest.raises(error, match=message): call()


# ---------------------------------------------------------------- verdicts on data with a known answer
def simulate(shift, paired, seed, n=10, spread=0.05, n_resamples=999):
    rng = np.random.default_rng(seed)
    baseline = rng.normal(0.5, spread, n)
    treatment = (baseline if paired else rng.normal(0.5, spread, n)) + shift + rng.normal(0, spread, n)
    return compare(treatment, baseline, paired=paired, n_resamples=n_resamples, seed=seed)


@pytest.mark.parametrize("paired", [True, False])
def test_large_true_effect_is_supported(paired):
    labels = [verdict(simulate(0.2, paired, seed)).label for seed in range(20)]
    assert labels == ["supported"] * 20


@pytest.mark.parametrize("paired", [True, False])
def test_reversed_effect_is_not_supported(paired):
    labels = [verdict(simulate(-0.2, paired, seed)).label for seed in range(20)]
    assert labels == ["not supported"] * 20


@pytest.mark.parametrize("paired", [True, False])
def test_identical_distributions_false_positive_rate_near_alpha(paired):
    labels = [verdict(simulate(0.0, paired, 1000 + seed)).label for seed in range(300)]
    supported, refuted = labels.count("supported") / 300, labels.count("not supported") / 300
    assert 0.01 <= supported <= 0.10                           # nominal 0.05, binomial SE 0.013
    assert 0.01 <= refuted <= 0.10


def test_lower_is_better_direction():
    rng = np.random.default_rng(8)
    steps = rng.normal(1000, 30, 8)
    faster = compare(steps * 0.8, steps, paired=True, alternative="less")
    slower = compare(steps * 1.2, steps, paired=True, alternative="less")
    assert verdict(faster, higher_is_better=False).label == "supported"
    assert verdict(slower, higher_is_better=False).label == "not supported"
    with pytest.raises(ValueError, match="alternative='greater'"): verdict(faster)
    with pytest.raises(ValueError, match="alternative='less'"): verdict(compare(steps, steps * 0.8, paired=True), higher_is_better=False)


def test_min_effect_rule():
    # a real but small gain (0.01 with tiny noise): significant, yet significantly below min_effect=0.05
    rng = np.random.default_rng(3)
    baseline = rng.normal(0.5, 0.05, 10)
    small = compare(baseline + 0.01 + rng.normal(0, 0.001, 10), baseline, paired=True)
    assert verdict(small).label == "supported"
    assert verdict(small, min_effect=0.005).label == "supported"
    assert verdict(small, min_effect=0.05).label == "not supported"
    # the shortfall test is the paired t on differences minus min_effect, as computed by hand
    d = small.treatment - small.baseline - 0.05
    t = d.mean() / (d.std(ddof=1) / math.sqrt(10))
    assert scipy_stats.t.cdf(t, 9) < 0.05


def test_holm_applied_across_family():
    base = simulate(0.2, True, 0)
    family = [dataclasses.replace(base, p_value=p) for p in (0.01, 0.03, 0.04)]
    alone = verdict(family[1])
    together = verdict(family)
    assert alone.label == "supported" and alone.p_value == pytest.approx(0.03)
    assert [v.label for v in together] == ["supported", "inconclusive", "inconclusive"]
    np.testing.assert_allclose([v.p_value for v in together], holm_reference([0.01, 0.03, 0.04]))
    assert isinstance(together[0], Verdict) and str(together[0]).startswith("supported: ")


def test_undefined_p_value_is_inconclusive():
    constant = compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], paired=True)
    assert math.isnan(constant.p_value)
    assert verdict(constant).label == "inconclusive"


@pytest.mark.parametrize("alpha", [0, 1, -0.5, 1.5, float("nan"), True, "0.05"])
def test_verdict_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number in"): verdict(simulate(0.2, True, 0), alpha=alpha)


def test_verdict_other_bad_input():
    good = simulate(0.2, True, 0)
    with pytest.raises(ValueError, match="min_effect must be"): verdict(good, min_effect=-1)
    with pytest.raises(ValueError, match="min_effect must be"): verdict(good, min_effect=float("nan"))
    with pytest.raises(ValueError, match="higher_is_better needs one value per comparison"): verdict([good, good], higher_is_better=[True])
    with pytest.raises(TypeError, match="comparisons must be"): verdict([])
    with pytest.raises(TypeError, match="comparisons must be"): verdict([0.01])


# ---------------------------------------------------------------- tables and figure
def test_comparison_table_rows_and_holm():
    family = {"IoU": simulate(0.2, True, 0), "accuracy": simulate(0.0, True, 1), "exact": simulate(-0.2, True, 2)}
    table = comparison_table(family)
    assert table.comparison.tolist() == ["IoU", "accuracy", "exact"]
    raw = [c.p_value for c in family.values()]
    np.testing.assert_allclose(table.p_value, raw)
    np.testing.assert_allclose(table.p_holm, holm_reference(raw))
    assert table.verdict[0] == "supported" and table.verdict[2] == "not supported"
    np.testing.assert_allclose(table.difference, [c.treatment.mean() - c.baseline.mean() for c in family.values()])
    named = comparison_table([dataclasses.replace(c, name=k) for k, c in family.items()])
    assert named.comparison.tolist() == table.comparison.tolist()
    with pytest.raises(ValueError, match="comparisons is empty"): comparison_table({})


def test_markdown_table_hand_written():
    import pandas as pd
    frame = pd.DataFrame({"name": ["a|b", "c"], "n": [3, 10], "x": [1234.5678, float("nan")], "ok": [True, False]})
    assert markdown_table(frame, digits=4) == (
        "| name | n | x | ok |\n"
        "| --- | ---: | ---: | --- |\n"
        "| a\\|b | 3 | 1235 | True |\n"
        "| c | 10 | nan | False |")


def test_plot_comparison_draws_the_values():
    import matplotlib
    matplotlib.use("Agg")
    result = simulate(0.1, True, 0, n=6)
    ax = plot_comparison(result)
    np.testing.assert_array_equal(ax.collections[0].get_offsets()[:, 1], result.treatment)
    np.testing.assert_array_equal(ax.collections[2].get_offsets()[:, 1], result.baseline)


def test_module_imports_without_pandas_or_matplotlib():
    code = "import sys, so8lab.stats; print('pandas' in sys.modules, 'matplotlib' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "False"]
