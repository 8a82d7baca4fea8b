"""Tests for so8lab.fewshot: disjoint adaptation sets (brute-force comparison, not the module's hashes), a fixed budget
whose weights never depend on the query, recipes tuned on compositions that are never targets, the caller's model and RNG untouched, frozen modules (BatchNorm included) in
eval mode, record reuse without base checkpoints, parallel = sequential, and the command line. Hypothesis settings
come from conftest.py."""
import copy, json, os, shutil, subprocess, sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from so8lab.adapters import ADAPTER_KINDS, adapted_layers, detach_adapters
from so8lab.fewshot import (ADAPTATION_METHODS, FEWSHOT_PRESETS, STREAM_STRIDE, adapt, adaptation_sets, fewshot_compositions,
                            fewshot_path, fewshot_study, tune_adaptation, tuning_compositions)
from so8lab.stats import compare_bases, noninferiority, paired_values, retention
from so8lab.models import GridModel, ModelConfig
from so8lab.primitives import composition_from_id
from so8lab.tasks import sample_tasks, split_compositions
from so8lab.training import evaluate

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig(d_model=32, bottleneck_dim=16, layers=2, heads=4, sae_width=24, mlp_ratio=2.0)
COMPOSITION = fewshot_compositions(1)[0]


def tiny_model(seed=0, config=TINY):
    torch.manual_seed(seed)
    return GridModel(config).eval()


@pytest.fixture(scope="module")
def sets():
    return adaptation_sets(COMPOSITION, seed=0, support_size=20, query_size=48)


def shared(a, b):
    "Brute force: number of sample pairs with identical input grid and program tokens."
    same = (a.inputs[:, None] == b.inputs[None]).flatten(2).all(2) & (a.tokens[:, None] == b.tokens[None]).all(2)
    return int(same.sum())


# ---------------------------------------------------------------- adaptation data

@settings(max_examples=12)
@given(index=st.integers(0, 119), seed=st.integers(0, 1000))
def test_sets_are_disjoint_single_composition_and_nested(index, seed):
    composition = fewshot_compositions(120)[index]
    drawn = adaptation_sets(composition, seed, 20, 30)
    assert sorted(drawn) == ["query", "support"]                                   # no labelled validation set of the target
    assert shared(drawn["support"], drawn["query"]) == 0
    for batch in drawn.values():
        assert batch.composition.unique().tolist() == [composition]
        assert len(set(composition_from_id(composition))) == 3                      # an unseen multi-hot set
        assert shared(batch, batch) == len(batch)                                  # only the diagonal: no repeats
        assert batch.demo_inputs is not None
    smaller = adaptation_sets(composition, seed, 5, 30)["support"]
    assert smaller.equal(drawn["support"][:5])


def test_compositions_are_heldout_and_distinct_from_training():
    training = {tuple(r) for r in split_compositions("train").tolist()}
    for composition in fewshot_compositions(120):
        assert composition_from_id(composition) not in training
    assert len(set(fewshot_compositions(120))) == 120
    for n in (1, 4, 60):                                                           # tuning never touches a target
        assert not set(tuning_compositions(n)) & set(fewshot_compositions(120 - n))
        assert all(composition_from_id(c) not in training for c in tuning_compositions(n))


def test_compositions_read_separate_streams():
    a, b = (adaptation_sets(c, 0, 10, 10)["support"] for c in fewshot_compositions(2))
    assert int(a.sample_index[0]) == fewshot_compositions(2)[0] * STREAM_STRIDE
    assert not torch.equal(a.inputs, b.inputs)


# ---------------------------------------------------------------- adapt: the caller's model and modes

@pytest.mark.parametrize("method", ADAPTATION_METHODS)
def test_caller_model_rng_and_flags_untouched(method, sets):
    base = tiny_model()
    base.train()
    base.primitive_head.weight.requires_grad_(False)                  # an unusual caller state that must survive
    before = copy.deepcopy(base.state_dict())
    rng = torch.get_rng_state()
    result = adapt(base, method, sets["support"], sets["query"], steps=10, eval_every=5,
                   learning_rate=1e-2 if method != "full" else 1e-3)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in base.modules())
    assert not base.primitive_head.weight.requires_grad and base.bottleneck_in.weight.requires_grad
    assert adapted_layers(base) == {}
    assert result.model is not base and not result.model.training


@pytest.mark.parametrize("method", ADAPTER_KINDS)
def test_only_adapter_parameters_change(method, sets):
    base = tiny_model()
    result = adapt(base, method, sets["support"], steps=20, eval_every=5)
    assert result.steps == 20                                         # the final state, after every step
    adapter_tensors = [p for w in adapted_layers(result.model).values() for p in w.adapter_parameters()]
    assert any(float(p.detach().abs().sum()) > 0 for p in adapter_tensors)
    restored = detach_adapters(copy.deepcopy(result.model)).state_dict()
    assert restored.keys() == base.state_dict().keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in restored.items())


class BatchNormGridModel(GridModel):
    "A GridModel with a BatchNorm on its logits: the layer whose statistics the reference implementation let drift."
    def __init__(self, config):
        super().__init__(config)
        self.norm = nn.BatchNorm2d(config.num_colors)

    def forward_batch(self, batch, **kwargs):
        output = super().forward_batch(batch, **kwargs)
        output.logits = self.norm(output.logits)
        return output


@pytest.mark.parametrize("method", ADAPTATION_METHODS)
def test_batchnorm_statistics_do_not_move(method, sets):
    torch.manual_seed(0)
    base = BatchNormGridModel(replace(TINY, dropout=0.3))
    base.train()
    base.forward_batch(sets["query"])                                # give the running statistics non-default values
    base.eval()
    statistics = {k: v.clone() for k, v in base.norm.state_dict().items() if "running" in k or "batches" in k}
    result = adapt(base, method, sets["support"], sets["query"], steps=10, eval_every=5)
    norm = result.model.norm
    for name, value in statistics.items(): assert torch.equal(norm.state_dict()[name], value), name


def test_every_base_module_runs_in_eval_mode(sets):
    base = tiny_model()
    modes = []
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: modes.append((name, module.training)))
               for name, m in base.named_modules()]
    base.train()
    for method in ADAPTATION_METHODS:
        adapt(base, method, sets["support"][:5], sets["query"], steps=4, eval_every=2)
    for h in handles: h.remove()
    assert modes and not [name for name, training in modes if training]


def test_dropout_is_off_during_adaptation(sets):
    "With dropout 0.5 active, the loss of a step would depend on the noise; in eval mode one step equals a no-noise step."
    torch.manual_seed(0)
    noisy = GridModel(replace(TINY, dropout=0.5)).eval()
    quiet = GridModel(TINY).eval()
    quiet.load_state_dict(noisy.state_dict())
    a = adapt(noisy, "full", sets["support"], sets["query"], steps=10, eval_every=5, seed=1)
    b = adapt(quiet, "full", sets["support"], sets["query"], steps=10, eval_every=5, seed=2)
    assert a.curve == b.curve


# ---------------------------------------------------------------- a fixed budget, the query only watched, tuning

@settings(max_examples=8)
@given(steps=st.integers(1, 25), eval_every=st.integers(1, 7))
def test_the_result_is_the_final_state_after_exactly_its_steps(steps, eval_every, sets):
    result = adapt(tiny_model(), "lora", sets["support"][:5], sets["query"], steps=steps, eval_every=eval_every)
    expected = sorted({0, steps, *range(eval_every, steps + 1, eval_every)})
    assert [s for s, _, _ in result.curve] == expected and result.steps == steps
    final = evaluate(result.model, sets["query"])
    assert (final["exact_match"], final["iou"]) == pytest.approx(result.curve[-1][1:], abs=1e-6)
    assert result.query == final


def deceptive(model, batch):
    "`batch` with `model`'s own predictions as targets (exact match 1 for that model)."
    with torch.no_grad(): predicted = model.forward_batch(batch).logits.argmax(1).to(batch.outputs.dtype)
    return replace(batch, outputs=predicted)


def test_the_query_never_changes_the_weights(sets):
    base = tiny_model()
    honest = adapt(base, "lora", sets["support"], sets["query"], steps=30, eval_every=5)
    fooled = adapt(base, "lora", sets["support"], deceptive(base, sets["query"]), steps=30, eval_every=5)
    blind = adapt(base, "lora", sets["support"], steps=30, eval_every=5)
    for other in (fooled, blind):
        assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in honest.model.state_dict().items())
    assert fooled.curve[0][1] == 1.0 and fooled.query["exact_match"] < 1.0      # a peeking selector would have kept step 0


def test_steps_to_gain_from_the_curve(sets):
    result = adapt(tiny_model(), "full", sets["support"], sets["query"], steps=40, eval_every=5, learning_rate=1e-3,
                   gains=(0.0, 0.005, 0.02, 0.99))
    start = result.curve[0][1]
    for gain, step in result.steps_to_gain.items():
        reached = [s for s, exact, _ in result.curve if exact >= start + gain]
        assert step == (reached[0] if reached else None)
    assert result.steps_to_gain[0.0] == 0 and result.steps_to_gain[0.99] is None


def test_tuning_picks_the_best_mean_gain_by_brute_force():
    base = tiny_model()
    tuning = {c: adaptation_sets(c, 0, 10, 24) for c in tuning_compositions(2)}
    recipe = tune_adaptation(base, "full", 10, tuning, (1e-3, 3e-3), 20, 10)
    table = {}
    for rate in (1e-3, 3e-3):
        runs = [adapt(base, "full", s["support"][:10], s["query"], 20, rate, 10, ()) for s in tuning.values()]
        for i, (step, _, _) in enumerate(runs[0].curve):
            table[(rate, step)] = (np.mean([r.curve[i][1] - r.curve[0][1] for r in runs]), np.mean([r.curve[i][2] - r.curve[0][2] for r in runs]))
    best = max(table, key=lambda key: (*table[key], -key[1], -key[0]))
    assert (recipe["rate"], recipe["steps"]) == best
    assert (recipe["exact_gain"], recipe["iou_gain"]) == pytest.approx(table[best], abs=1e-12)
    assert len(recipe["grid"]) == len(table) == 6                                # steps 0, 10, 20 at each rate


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs, message", [
    (dict(method="adalora"), "method must be one of"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(eval_every=1.5), "eval_every must be a positive integer"),
    (dict(learning_rate=-1e-3), r"learning_rate must be a finite number in \(0, inf\)"),
    (dict(gains=(1.5,)), r"gains must be a finite number in \[0, 1\)"),
    (dict(adapter_options={"r": 0}), "r must be a positive integer"),
])
def test_bad_arguments_are_named(kwargs, message, sets):
    arguments = {**dict(model=tiny_model(), method="lora", support=sets["support"], query=sets["query"]), **kwargs}
    with pytest.raises(ValueError, match=message): adapt(**arguments)


def test_bad_sets_are_named(sets):
    base = tiny_model()
    mixed = sample_tasks(6, "heldout", 0, composition=torch.tensor(fewshot_compositions(2) * 3))
    with pytest.raises(ValueError, match="support must hold one composition"): adapt(base, "lora", mixed, sets["query"])
    other = adaptation_sets(fewshot_compositions(2)[1], 0, 5, 5)
    with pytest.raises(ValueError, match="query holds composition"): adapt(base, "lora", sets["support"], other["query"])
    with pytest.raises(ValueError, match="query shares 2 sample"): adapt(base, "lora", sets["support"], sets["support"][:2])
    with pytest.raises(ValueError, match="support must be a non-empty"): adapt(base, "lora", sets["support"][:0], sets["query"])
    with pytest.raises(TypeError, match="model must be an nn.Module"): adapt(nn.Linear(2, 2), "lora", sets["support"], sets["query"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(shots=(5, 0)), "shots must be a"),
    (dict(shots=(-1,)), "shots must be a"),
    (dict(compositions=0), "compositions must be a positive integer"),
    (dict(adaptation_methods=("lora", "prefix")), "adaptation_methods"),
    (dict(base_methods=("B4",)), "base_methods"),
    (dict(compositions=120), "compositions \\+ tuning_compositions"),
])
def test_bad_study_settings_are_named(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message): fewshot_study(seeds=[0], preset="smoke", results_dir=tmp_path, device="cpu", **kwargs)
    assert not (tmp_path / "fewshot").exists()


def test_bad_composition_and_sizes_are_named():
    with pytest.raises(ValueError, match="composition must be a held-out"): adaptation_sets(3)          # a training composition
    with pytest.raises(ValueError, match="query_size must be a positive"): adaptation_sets(COMPOSITION, query_size=0)
    with pytest.raises(ValueError, match="n must be an integer"): fewshot_compositions(121)


# ---------------------------------------------------------------- statistics helpers

@settings(max_examples=30)
@given(values=st.lists(st.floats(0, 1), min_size=3, max_size=12), shift=st.floats(-0.1, 0.1), seed=st.integers(0, 100))
def test_noninferiority_matches_scipy_and_never_supports_more_parameters(values, shift, seed):
    baseline = np.array(values)
    treatment = baseline + shift + np.random.default_rng(seed).normal(0, 0.01, len(values))
    row = noninferiority(treatment, baseline, 0.01, 0.05, 2000, 1000)
    assert row["verdict"] == "not supported"
    cheaper = noninferiority(treatment, baseline, 0.01, 0.05, 500, 1000)
    reference = scipy.stats.ttest_1samp(treatment - baseline + 0.01, 0.0, alternative="greater").pvalue
    assert cheaper["p_noninferior"] == pytest.approx(reference, rel=1e-9, abs=1e-12)
    expected = "supported" if reference < 0.05 else ("not supported" if 1 - reference < 0.05 else "inconclusive")
    assert cheaper["verdict"] == expected


@settings(max_examples=30)
@given(values=st.lists(st.floats(0, 1), min_size=3, max_size=12), gain=st.floats(-0.02, 0.05), kept=st.floats(-0.5, 1.5),
       fraction=st.floats(0, 1), seed=st.integers(0, 100))
def test_retention_matches_scipy(values, gain, kept, fraction, seed):
    rng = np.random.default_rng(seed)
    untreated = np.array(values)
    reference = untreated + gain + rng.normal(0, 0.005, len(values))
    treatment = untreated + kept * gain + rng.normal(0, 0.005, len(values))
    row = retention(treatment, reference, untreated, fraction, 0.05, 464, 1024)
    difference = (treatment - untreated) - fraction * (reference - untreated)
    p_kept = scipy.stats.ttest_1samp(difference, 0.0, alternative="greater").pvalue
    p_short = scipy.stats.ttest_1samp(difference, 0.0, alternative="less").pvalue
    p_gain = scipy.stats.ttest_1samp(reference - untreated, 0.0, alternative="greater").pvalue
    assert row["p_retained"] == pytest.approx(p_kept, rel=1e-7, abs=1e-12)
    expected = "not supported" if p_short < 0.05 else ("supported" if p_kept < 0.05 and p_gain < 0.05 else "inconclusive")
    assert row["verdict"] == expected
    assert retention(treatment, reference, untreated, fraction, 0.05, 1024, 1024)["verdict"] == "not supported"


def test_paired_values_and_compare_bases_by_hand():
    import pandas as pd
    frame = pd.DataFrame({"base_method": ["proposed", "B0"] * 4, "seed": [0, 0, 0, 0, 1, 1, 1, 1], "composition": [5] * 8,
                          "shots": [5, 5, 20, 20] * 2, "adaptation_method": ["lora"] * 8,
                          "query_iou": [0.3, 0.1, 0.5, 0.2, 0.4, 0.3, 0.6, 0.2]})
    treated, baseline = paired_values(frame, "query_iou", "base_method", "proposed", "B0")
    assert treated.tolist() == pytest.approx([0.4, 0.5]) and baseline.tolist() == pytest.approx([0.15, 0.25])
    found = compare_bases(frame, "query_iou")
    at20 = found["query_iou at 20 shots: proposed base vs B0 base (higher is better)"]
    assert at20.p_value == pytest.approx(scipy.stats.ttest_rel([0.5, 0.6], [0.2, 0.2], alternative="greater").pvalue)


# ---------------------------------------------------------------- the study: records, reuse, workers, CLI

@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    "Smoke-preset base runs B0 seeds 0 and 1 (trained once for this module)."
    from so8lab.experiments import run_many
    directory = tmp_path_factory.mktemp("runs")
    run_many(["B0"], [0, 1], "smoke", directory, "cpu")
    return directory


def copy_runs(source, destination):
    for part in ("records", "checkpoints"): shutil.copytree(source / part, destination / part)
    return destination


def test_parallel_study_equals_sequential_and_reuses_records(smoke_runs, tmp_path):
    sequential = fewshot_study(["B0"], [0, 1], "smoke", copy_runs(smoke_runs, tmp_path / "a"), device="cpu")
    parallel = fewshot_study(["B0"], [0, 1], "smoke", copy_runs(smoke_runs, tmp_path / "b"), device="cpu", workers=2,
                             executor="local")          # a Dask LocalCluster of two worker processes
    settings_ = FEWSHOT_PRESETS["smoke"]
    assert len(sequential) == 2 * settings_.compositions * len(settings_.shots) * len(settings_.adaptation_methods)
    columns = [c for c in sequential.columns if c not in ("wall_seconds", "step_seconds")]   # timings differ
    assert sequential[columns].equals(parallel[columns])
    shutil.rmtree(tmp_path / "b" / "checkpoints")                       # records brought back without checkpoints
    again = fewshot_study(["B0"], [0, 1], "smoke", tmp_path / "b", device="cpu")
    assert again.equals(parallel) and not (tmp_path / "b" / "checkpoints").exists()
    record = json.loads(fewshot_path(tmp_path / "b", "B0", 1).read_text())
    assert record["seed"] == 1 and record["device_type"] == "cpu" and len(record["config_hash"]) == 16
    assert not [p for p in (tmp_path / "b" / "fewshot").iterdir() if p.suffix != ".json" and p.name != ".locks"]


def test_censored_steps_are_the_runs_own_length(smoke_runs, tmp_path):
    frame = fewshot_study(["B0"], [0], "smoke", copy_runs(smoke_runs, tmp_path / "c"), device="cpu")
    gain = FEWSHOT_PRESETS["smoke"].gains[0]
    unreached = frame[~frame[f"reached_gain_{gain}"]]
    assert (unreached[f"steps_to_gain_{gain}"] == unreached.steps).all()
    assert (frame.steps <= FEWSHOT_PRESETS["smoke"].max_steps).all()
    assert (frame[frame.unadapted].gain_exact_match == 0).all()
    record = json.loads(fewshot_path(tmp_path / "c", "B0", 0).read_text())
    for row in frame.itertuples():                                                 # each target used its own tuned recipe
        recipe = record["recipes"][f"{row.adaptation_method}-{row.shots}"]
        assert (row.steps, row.learning_rate) == (recipe["steps"], recipe["rate"])


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "so8lab.reports", "fewshot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_command_line(smoke_runs, tmp_path):
    directory = copy_runs(smoke_runs, tmp_path / "d")
    result = cli("--preset", "smoke", "--results-dir", str(directory), "--seeds", "0", "--base-methods", "B0", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "B0        seed 0  2 adaptations" in result.stdout and "1 records in" in result.stdout
    assert fewshot_path(directory, "B0", 0).exists()
    bad = cli("--preset", "huge", "--results-dir", str(directory))
    assert bad.returncode == 2 and "unknown preset 'huge'" in bad.stderr


# ---------------------------------------------------------------- the adapter Pareto study

def test_pareto_variants_train_what_their_names_say():
    "Every Pareto method builds, and the trainable parameter counts of ours follow hand formulas on the tiny model's two layers."
    from so8lab.fewshot import ADAPTER_VARIANTS, PARETO_METHODS, adaptable_copy
    from so8lab.models import count_parameters
    base = tiny_model()
    outs = (TINY.bottleneck_dim, TINY.d_model)          # bottleneck_in: d_model -> bottleneck; bottleneck_out: bottleneck -> d_model
    ins = (TINY.d_model, TINY.bottleneck_dim)
    assert set(PARETO_METHODS) <= set(ADAPTER_VARIANTS) and len(set(PARETO_METHODS)) == len(PARETO_METHODS)
    counts = {m: count_parameters(adaptable_copy(base, m)) for m in PARETO_METHODS}
    for r in (1, 2, 4, 8):
        assert counts["lora" if r == 4 else f"lora-r{r}"] == sum(r * (i + o) for i, o in zip(ins, outs))
    assert counts["so8"] == sum(29 * o // 8 for o in outs) and counts["so8-ungated"] == sum(28 * o // 8 for o in outs)
    for k in (2, 4, 8):
        selector = sum((o + 1) * k for o in outs)
        for suffix in ("", "-ste", "-gumbel"):
            name = "lightweight_so8" if (k, suffix) == (4, "") else f"lightweight_so8-k{k}{suffix}"
            assert counts[name] == sum(28 * k * o // 8 for o in outs) + selector
    assert counts["full"] == count_parameters(base, trainable_only=False)
    for peer in ("oft", "hra", "road"): assert 0 < counts[peer] < counts["full"]


def test_pareto_front_matches_brute_force():
    from so8lab.fewshot import pareto_front
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, g = rng.integers(1, 5, 12), rng.integers(0, 4, 12)
        brute = [not any(p[j] <= p[i] and g[j] >= g[i] and (p[j] < p[i] or g[j] > g[i]) for j in range(12)) for i in range(12)]
        assert pareto_front(p, g).tolist() == brute
