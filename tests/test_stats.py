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

from so8lab.stats import (BELOW_COMPETENCE, Comparison, Verdict, ablation_table, bootstrap_aggregates, bootstrap_ci, cohens_d,
                          cohens_dz, compare, compare_methods, comparison_table, difference_ci, event_groups, hedges_correction,
                          hedges_g, holm, interquartile_mean, kaplan_meier, logrank, markdown_table, paired_t_tests, plot_comparison,
                          plot_survival, primary_rows, primary_table, probability_of_improvement, seed_pairs, seeds_for_power,
                          time_to_event_table, verdict, verdict_rows)


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


def test_a_family_below_competence_gets_no_verdict_but_keeps_its_numbers():
    family = {"IoU": simulate(0.2, True, 0), "exact": simulate(-0.2, True, 2)}
    judged, gated = comparison_table(family), comparison_table(family, competent=False, competence="B0 0/4 runs reach 0.95")
    assert gated.verdict.tolist() == ["not testable: below competence"] * 2 and judged.verdict[0] == "supported"
    np.testing.assert_allclose(gated.p_holm, judged.p_holm)
    np.testing.assert_allclose(gated.difference, judged.difference)
    rows = verdict_rows(gated, "H4", "{comparison}")
    assert all(r["evidence"].endswith("; below competence: B0 0/4 runs reach 0.95") for r in rows)
    assert not any("below competence" in r["evidence"] for r in verdict_rows(judged, "H4", "{comparison}"))


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


def test_module_imports_without_pandas_matplotlib_statsmodels_or_lifelines():
    code = "import sys, so8lab.stats; print(*(m in sys.modules for m in ('pandas', 'matplotlib', 'statsmodels', 'lifelines')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False"] * 4


# ---------------------------------------------------------------- primary family: paired t-tests and TOST
def t_reference(treatment, baseline, sesoi, confidence=0.95):
    "Mean difference, t interval, one-sided p for > 0 and < 0, and TOST p, from the t distribution written out."
    d = [a - b for a, b in zip(treatment, baseline)]
    n = len(d)
    mean = math.fsum(d) / n
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    half = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * se
    t = mean / se
    tost = max(scipy_stats.t.sf((mean + sesoi) / se, n - 1), scipy_stats.t.cdf((mean - sesoi) / se, n - 1))
    return mean, mean - half, mean + half, scipy_stats.t.sf(t, n - 1), scipy_stats.t.cdf(t, n - 1), tost


@given(st.integers(0, 10_000), st.integers(3, 15), st.floats(-0.1, 0.1), st.floats(0.005, 0.2), st.booleans())
@settings(max_examples=60, deadline=None)
def test_paired_t_tests_against_t_formulas(seed, n, shift, sesoi, higher_is_better):
    rng = np.random.default_rng(seed)
    baseline = rng.normal(0.5, 0.05, n)
    treatment = baseline + shift + rng.normal(0, 0.03, n)
    found = paired_t_tests(treatment, baseline, sesoi, higher_is_better)
    mean, low, high, p_greater, p_less, tost = t_reference(treatment, baseline, sesoi)
    better, worse = (p_greater, p_less) if higher_is_better else (p_less, p_greater)
    np.testing.assert_allclose([found["difference"], found["difference_low"], found["difference_high"]], [mean, low, high], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([found["p_better"], found["p_worse"], found["p_equivalent"]], [better, worse, tost], rtol=1e-7, atol=1e-12)
    assert found["seeds"] == n
    assert found["d_z"] == pytest.approx(mean / (math.sqrt(n) * ((high - mean) / scipy_stats.t.ppf(0.975, n - 1))), rel=1e-9)


def test_paired_t_tests_undefined_without_spread_and_bad_input():
    found = paired_t_tests([0.6, 0.7, 0.8], [0.5, 0.6, 0.7], sesoi=0.05)      # differences equal up to rounding
    assert all(math.isnan(found[k]) for k in ("p_better", "p_worse", "p_equivalent"))
    with pytest.raises(ValueError, match="sesoi must be a finite number in"): paired_t_tests([1.0, 2.0], [1.0, 1.5], sesoi=0)
    with pytest.raises(ValueError, match="need at least 2 paired seeds"): paired_t_tests([1.0], [1.0], sesoi=0.1)
    with pytest.raises(ValueError, match="paired=True needs treatment and baseline of equal length"):
        paired_t_tests([1.0, 2.0, 3.0], [1.0, 2.0], sesoi=0.1)
    with pytest.raises(TypeError, match="higher_is_better must be True or False"): paired_t_tests([1.0, 2.0], [1.0, 1.5], 0.1, "yes")


def family_by_design(seed=0, n=10):
    "Metrics whose answer is known: a large gain, a large loss, no effect with little spread, no effect with much spread."
    rng = np.random.default_rng(seed)
    base, noise = rng.normal(0.5, 0.05, n), rng.normal(0, 0.08, n)
    return {"gain": (base + 0.05 + rng.normal(0, 0.01, n), base), "loss": (base - 0.05 + rng.normal(0, 0.01, n), base),
            "flat": (base + rng.normal(0, 0.004, n), base), "noisy": (base + noise - noise.mean(), base)}   # mean difference 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_primary_table_labels_and_holm_per_kind(seed):
    pairs = family_by_design(seed)
    table = primary_table(pairs, dict.fromkeys(pairs, 0.02))
    assert table.verdict.tolist() == ["supported", "worse", "equivalent", "inconclusive"]
    references = [t_reference(*pair, 0.02) for pair in pairs.values()]
    for column, k in (("p_better", 3), ("p_worse", 4), ("p_equivalent", 5)):
        raw = [r[k] for r in references]
        np.testing.assert_allclose(table[column], raw, rtol=1e-7)
        np.testing.assert_allclose(table[column + "_holm"], holm_reference(raw), rtol=1e-7)   # one family per kind
    assert table.metric.tolist() == list(pairs) and (table.comparison == table.metric + ": proposed vs B0").all()
    assert set(table.competence) == {""}


def test_primary_verdict_rule_by_hand():
    "The rule applied literally to Holm p-values computed by the reference functions."
    for seed in range(8):
        pairs = family_by_design(seed, n=6)
        table = primary_table(pairs, dict.fromkeys(pairs, 0.03), alpha=0.1)
        references = [t_reference(*pair, 0.03) for pair in pairs.values()]
        better, worse, equivalent = (holm_reference([r[k] for r in references]) for k in (3, 4, 5))
        for i, label in enumerate(table.verdict):
            expected = ("equivalent" if equivalent[i] < 0.1 else "supported" if better[i] < 0.1
                        else "worse" if worse[i] < 0.1 else "inconclusive")
            assert label == expected


def test_significant_but_trivial_gain_is_equivalent_not_supported():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.05, 20)
    tiny = {"iou": (base + 0.005 + rng.normal(0, 0.002, 20), base)}
    table = primary_table(tiny, {"iou": 0.02})
    assert table.p_better_holm[0] < 0.05 and table.p_equivalent_holm[0] < 0.05
    assert table.verdict[0] == "equivalent" and "better but by less than the SESOI" in table.reason[0]
    assert primary_table(tiny, {"iou": 0.001}).verdict[0] == "supported"        # above a smaller SESOI it matters


def test_lower_is_better_and_competence_gate():
    pairs = family_by_design(0)
    lower = primary_table(pairs, dict.fromkeys(pairs, 0.02), higher_is_better={m: False for m in pairs})
    assert lower.verdict.tolist() == ["worse", "supported", "equivalent", "inconclusive"]
    assert set(lower.direction) == {"lower"}
    gated = primary_table(pairs, dict.fromkeys(pairs, 0.02), competent=False, competence="B0 IoU 0.08 < 0.30")
    assert set(gated.verdict) == {BELOW_COMPETENCE} and set(gated.competence) == {"B0 IoU 0.08 < 0.30"}
    rows = primary_rows(gated, "H1", "{metric}")
    assert all(r["evidence"].endswith("; below competence: B0 IoU 0.08 < 0.30") for r in rows)


def test_primary_table_bad_input():
    pairs = family_by_design(0)
    with pytest.raises(ValueError, match="pairs is empty"): primary_table({}, {})
    with pytest.raises(ValueError, match=r"sesoi has no value for \['loss', 'flat', 'noisy'\]"): primary_table(pairs, {"gain": 0.1})
    with pytest.raises(ValueError, match=r"higher_is_better has no value for \['flat', 'noisy'\]"):
        primary_table(pairs, dict.fromkeys(pairs, 0.1), higher_is_better={"gain": True, "loss": True})
    with pytest.raises(ValueError, match=r"sesoi\['gain'\] must be a finite number in \(0, inf\)"): primary_table(pairs, dict.fromkeys(pairs, 0.0))
    with pytest.raises(ValueError, match="alpha must be"): primary_table(pairs, dict.fromkeys(pairs, 0.1), alpha=1.0)
    with pytest.raises(TypeError, match="competent must be True or False"): primary_table(pairs, dict.fromkeys(pairs, 0.1), competent="no")


def test_primary_rows_keep_the_verdict_rows_keys():
    import pandas as pd
    frame = pd.DataFrame({"method": ["B0"] * 4 + ["proposed"] * 4 + ["B1"] * 3, "seed": [0, 1, 2, 3] * 2 + [0, 1, 2],
                          "iou": [0.50, 0.52, 0.49, 0.51, 0.60, 0.61, 0.60, 0.62, 0.4, 0.4, 0.4]})
    pairs = seed_pairs(frame, "proposed", "B0", ["iou"])
    np.testing.assert_allclose(pairs["iou"][0], [0.60, 0.61, 0.60, 0.62])
    np.testing.assert_allclose(pairs["iou"][1], [0.50, 0.52, 0.49, 0.51])
    rows = primary_rows(primary_table(pairs, {"iou": 0.02}), "H1", "held-out {comparison}")
    old = verdict_rows(comparison_table(compare_methods(frame, "proposed", ["B0"], ["iou"])), "H1", "held-out {comparison}")
    assert set(old[0]) <= set(rows[0]) and rows[0]["question"] == old[0]["question"]
    assert rows[0]["verdict"] == "supported" and "worse=" in rows[0]["evidence"] and "equivalent=" in rows[0]["evidence"]
    assert rows[0]["p_holm"] == pytest.approx(scipy_stats.ttest_rel(*pairs["iou"], alternative="greater").pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="frame has no column 'acc'"): seed_pairs(frame, "proposed", "B0", ["acc"])
    with pytest.raises(ValueError, match="need >= 2 seeds with both proposed and B2"): seed_pairs(frame, "proposed", "B2", ["iou"])


# ---------------------------------------------------------------- ablations
def test_ablation_table_two_sided_estimates():
    pairs = family_by_design(3)
    table = ablation_table(pairs)
    for row, (treatment, ablation) in zip(table.itertuples(), pairs.values()):
        mean, low, high, p_greater, p_less, _ = t_reference(treatment, ablation, 0.1)
        assert row.p_two_sided == pytest.approx(2 * min(p_greater, p_less), rel=1e-9)
        np.testing.assert_allclose([row.difference, row.difference_low, row.difference_high], [mean, low, high], rtol=1e-9)
        assert row.d_z == pytest.approx(cohens_dz(treatment, ablation))
    assert not {"verdict", "p_holm"} & set(table.columns)
    with pytest.raises(ValueError, match="pairs is empty"): ablation_table({})


# ---------------------------------------------------------------- IQM, probability of improvement, stratified bootstrap
def iqm_reference(scores):
    "Interquartile mean by sorting all scores and dropping floor(N/4) at each end."
    values = sorted(float(x) for x in np.ravel(scores))
    cut = len(values) // 4
    kept = values[cut:len(values) - cut]
    return math.fsum(kept) / len(kept)


def improvement_reference(x, y):
    "P(X > Y) + P(X = Y)/2 with an explicit double loop per composition, then the mean over compositions."
    total = 0.0
    for c in range(x.shape[1]):
        wins = 0.0
        for a in x[:, c]:
            for b in y[:, c]:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
        total += wins / (x.shape[0] * y.shape[0])
    return total / x.shape[1]


@given(st.integers(0, 10_000), st.integers(1, 9), st.integers(1, 9), st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_iqm_and_improvement_against_brute_force(seed, seeds_x, seeds_y, compositions):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 5, (seeds_x, compositions)).astype(float), rng.integers(0, 5, (seeds_y, compositions)).astype(float)
    assert interquartile_mean(x) == pytest.approx(iqm_reference(x), rel=1e-12, abs=1e-12)
    assert probability_of_improvement(x, y) == pytest.approx(improvement_reference(x, y), rel=1e-12, abs=1e-12)
    assert probability_of_improvement(x, y) + probability_of_improvement(y, x) == pytest.approx(1.0)


def test_bootstrap_aggregates_one_composition_matches_scipy():
    scores = np.random.default_rng(4).normal(0.6, 0.1, (20, 1))
    ours = bootstrap_aggregates(scores, scores - 0.05, n_resamples=4000, seed=0)
    theirs = scipy_stats.bootstrap((scores[:, 0],), lambda x, axis: scipy_stats.trim_mean(x, 0.25, axis=axis),
                                   method="percentile", n_resamples=4000, rng=np.random.default_rng(1)).confidence_interval
    np.testing.assert_allclose(ours.loc[0, ["low", "high"]].to_numpy(float), [theirs.low, theirs.high], atol=0.01)
    assert ours.estimate[0] == pytest.approx(iqm_reference(scores))
    assert ours.statistic.tolist() == ["IQM treatment", "IQM baseline", "IQM treatment - baseline", "P(treatment > baseline)"]


def test_bootstrap_aggregates_is_stratified_paired_and_deterministic():
    constant = np.tile(np.arange(5.0), (8, 1))                      # resampling within compositions changes nothing
    collapsed = bootstrap_aggregates(constant, constant[:6] + 0.5, n_resamples=300)
    np.testing.assert_allclose(collapsed.low, collapsed.high, atol=1e-12)
    np.testing.assert_allclose(collapsed.estimate, [iqm_reference(constant), iqm_reference(constant + 0.5), -0.5, 0.0])
    noisy = np.random.default_rng(5).normal(0.5, 0.1, (10, 6))
    paired = bootstrap_aggregates(noisy + 0.1, noisy, n_resamples=300, paired=True)
    np.testing.assert_allclose(paired.loc[2, ["estimate", "low", "high"]].to_numpy(float), [0.1] * 3, atol=1e-9)
    unpaired = bootstrap_aggregates(noisy + 0.1, noisy, n_resamples=300)
    assert unpaired.high[2] - unpaired.low[2] > 0.01                # independent resamples do not cancel
    again = bootstrap_aggregates(noisy + 0.1, noisy, n_resamples=300)
    np.testing.assert_array_equal(again.to_numpy(), unpaired.to_numpy())
    assert ((unpaired.low <= unpaired.estimate) & (unpaired.estimate <= unpaired.high)).all()


def test_bootstrap_aggregates_bad_input():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="same compositions"): bootstrap_aggregates(x, x[:, :2])
    with pytest.raises(ValueError, match="paired=True needs the same seeds"): bootstrap_aggregates(x, x[:3], paired=True)
    with pytest.raises(ValueError, match="treatment must be 2-D"): bootstrap_aggregates(x[0], x)
    with pytest.raises(ValueError, match="baseline contains NaN"): bootstrap_aggregates(x, np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="n_resamples must be"): bootstrap_aggregates(x, x, n_resamples=0)


# ---------------------------------------------------------------- power for the seed count
def power_reference(d, n, alpha):
    "Power of the one-sided one-sample t-test from the noncentral t distribution."
    return scipy_stats.nct.sf(scipy_stats.t.ppf(1 - alpha, n - 1), n - 1, d * math.sqrt(n))


@pytest.mark.parametrize("sd, sesoi, alpha", [(1.0, 0.5, 0.05), (0.02, 0.01, 0.05), (0.01, 0.012, 0.01), (3.0, 0.4, 0.1)])
def test_seeds_for_power_is_the_smallest_sufficient_n(sd, sesoi, alpha):
    pilot = np.array([-1.0, 1.0]) * sd / math.sqrt(2)               # SD exactly `sd`
    plan = seeds_for_power(pilot, sesoi, alpha=alpha, minimum=2)
    d = sesoi / sd
    assert plan["effect_size"] == pytest.approx(d) and plan["sd"] == pytest.approx(sd)
    assert power_reference(d, plan["required"], alpha) >= 0.8
    assert plan["required"] == 2 or power_reference(d, plan["required"] - 1, alpha) < 0.8
    assert plan["seeds"] == plan["required"]


def test_seeds_for_power_table_value_floor_and_simulation():
    pilot = np.array([-1.0, 1.0]) / math.sqrt(2)
    assert seeds_for_power(pilot, 0.5)["required"] == 27            # G*Power: d = 0.5, one-sided 0.05, power 0.8
    assert seeds_for_power(pilot, 5.0)["seeds"] == 10                # floor
    n = seeds_for_power(pilot, 0.8, minimum=2)["required"]
    samples = np.random.default_rng(0).normal(0.8, 1.0, (20_000, n))  # true difference = sesoi, SD 1
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(n))
    rate = (t > scipy_stats.t.ppf(0.95, n - 1)).mean()
    assert 0.8 - 0.01 < rate and rate == pytest.approx(power_reference(0.8, n, 0.05), abs=0.01)
    assert seeds_for_power(np.array([0.1, 0.1, 0.1]), 0.05)["required"] == 2   # no spread: any 2 seeds do
    with pytest.raises(ValueError, match="at least 2 pilot seeds"): seeds_for_power([0.1], 0.05)
    with pytest.raises(ValueError, match="power must be"): seeds_for_power(pilot, 0.5, power=1.0)


# ---------------------------------------------------------------- time to event
def kaplan_meier_reference(durations, reached):
    "Product-limit estimate and exponential Greenwood 95% bounds with loops, at 0 and each distinct time."
    z, survival, greenwood, rows = scipy_stats.norm.ppf(0.975), 1.0, 0.0, [(0.0, 1.0, 1.0, 1.0)]
    for t in sorted(set(durations)):
        at_risk = sum(1 for x in durations if x >= t)
        events = sum(1 for x, r in zip(durations, reached) if x == t and r)
        survival *= 1 - events / at_risk
        if events and at_risk > events: greenwood += events / (at_risk * (at_risk - events))
        if 0 < survival < 1:
            spread = z * math.sqrt(greenwood) / abs(math.log(survival))
            rows.append((t, survival, survival ** math.exp(spread), survival ** math.exp(-spread)))
        else: rows.append((t, survival, math.nan, math.nan))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_kaplan_meier_against_product_limit_loop(seed):
    rng = np.random.default_rng(seed)
    durations = rng.integers(1, 12, 15).astype(float)
    reached = rng.random(15) < 0.7
    curve, reference = kaplan_meier(durations, reached), kaplan_meier_reference(durations.tolist(), reached.tolist())
    np.testing.assert_allclose(curve.time, [r[0] for r in reference])
    np.testing.assert_allclose(curve.survival, [r[1] for r in reference], atol=1e-12)
    inside = [i for i, r in enumerate(reference) if not math.isnan(r[2])]
    np.testing.assert_allclose(curve.survival_low[inside], [reference[i][2] for i in inside], rtol=1e-7)
    np.testing.assert_allclose(curve.survival_high[inside], [reference[i][3] for i in inside], rtol=1e-7)
    assert curve.reached.sum() == reached.sum() and curve.censored.sum() == (~reached).sum()


def test_kaplan_meier_hand_worked_and_median():
    durations, reached = [2, 3, 3, 5, 6, 8], [True, True, False, True, False, True]
    np.testing.assert_allclose(kaplan_meier(durations, reached).survival, [1, 5 / 6, 2 / 3, 4 / 9, 4 / 9, 0])
    table = time_to_event_table({"a": (durations, reached), "never": ([5, 6, 7], [False, False, False])})
    assert table.median_time.tolist() == [5.0, math.inf]              # first time with S <= 1/2; inf if never
    assert table.runs.tolist() == [6, 3] and table.reached.tolist() == [4, 0]
    with pytest.raises(ValueError, match="reached must be booleans"): kaplan_meier([1.0, 2.0], [0.5, 1.0])
    with pytest.raises(ValueError, match="durations contains"): kaplan_meier([1.0, np.nan], [True, True])


def logrank_reference(a, b):
    "Log-rank chi-square with loops over the distinct event times."
    observed = expected = variance = 0.0
    times = sorted({t for t, r in zip(*a) if r} | {t for t, r in zip(*b) if r})
    for t in times:
        n1, n2 = sum(1 for x in a[0] if x >= t), sum(1 for x in b[0] if x >= t)
        e1 = sum(1 for x, r in zip(*a) if x == t and r)
        e = e1 + sum(1 for x, r in zip(*b) if x == t and r)
        n = n1 + n2
        observed += e1
        expected += e * n1 / n
        if n > 1: variance += e * (n1 / n) * (n2 / n) * (n - e) / (n - 1)
    statistic = (observed - expected) ** 2 / variance
    return statistic, scipy_stats.chi2.sf(statistic, 1)


@pytest.mark.parametrize("seed", range(4))
def test_logrank_against_loop(seed):
    import pandas as pd
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"method": ["proposed"] * 8 + ["B0"] * 9, "steps": rng.integers(1, 10, 17).astype(float),
                          "reached": rng.random(17) < 0.8})
    groups = event_groups(frame, "steps", "reached")
    assert list(groups) == ["proposed", "B0"]
    found = logrank(groups)
    statistic, p = logrank_reference([g.tolist() for g in groups["proposed"]], [g.tolist() for g in groups["B0"]])
    assert found["statistic"] == pytest.approx(statistic, rel=1e-9) and found["p_value"] == pytest.approx(p, rel=1e-9)
    with pytest.raises(ValueError, match="groups has no method 'B1'"): logrank(groups, baseline="B1")
    with pytest.raises(ValueError, match="frame has no column 'seconds'"): event_groups(frame, "seconds", "reached")


def test_plot_survival_draws_one_minus_km():
    import matplotlib
    matplotlib.use("Agg")
    groups = {"a": ([2, 3, 3, 5, 6, 8], [True, True, False, True, False, True]), "b": ([1, 4], [True, True])}
    ax = plot_survival(groups)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 1 - np.array([1, 5 / 6, 2 / 3, 4 / 9, 4 / 9, 0]))
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [0, 0.5, 1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (4/6)", "b (2/2)"]
