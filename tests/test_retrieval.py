"""Tests of so8lab.retrieval (issue 14, H5): the dual encoder, candidate sets, retrieval metrics and calibration rows.

References are independent of the module: brute-force averages over every tie-breaking permutation, Monte Carlo
rankings, explicit parameter enumeration with itertools, Python loops of `apply_program` over decoded `Step`s,
Hamming distances counted cell by cell, and `clip_loss_reference` on the model's own embeddings."""
import itertools
import math
import numpy as np
import pytest
import torch

from so8lab.kernels import clip_loss_reference
from so8lab.primitives import PRIMITIVES, PRIMITIVE_INDEX, apply_program, decode_program
from so8lab.tasks import sample_tasks, split_compositions
from so8lab.retrieval import (DualEncoder, DualEncoderConfig, ProgramSet, all_programs, chance_metrics, distinct_programs,
                              executor_retrieval, heldout_candidates, nearest_neighbour_retrieval, parameter_values,
                              program_keys, retrieval_batch, retrieval_metrics, retrieval_scores, retrieval_table,
                              train_dual_encoder, true_program_mask)

SMALL = DualEncoderConfig(d_model=16, embed_dim=16, heads=2, pair_layers=1, program_layers=1)


@pytest.fixture(scope="module")
def everything():
    return all_programs()


@pytest.fixture(scope="module")
def heldout():
    queries = sample_tasks(64, "heldout", seed=11)
    return queries, heldout_candidates(queries)


# ---------------------------------------------------------------------------------------------------------------
# Metrics against brute force and Monte Carlo

def brute_force(scores, correct, ks):
    "Mean over queries of top-k hits and 1/rank, averaged over every permutation used as tie-breaker."
    out = np.zeros(len(ks) + 1)
    for row, hits in zip(scores.tolist(), correct.tolist()):
        orders = list(itertools.permutations(range(len(row))))
        for order in orders:
            ranking = sorted(range(len(row)), key=lambda i: (-row[i], order[i]))
            rank = 1 + min(r for r, i in enumerate(ranking) if hits[i])
            out += np.array([rank <= k for k in ks] + [1 / rank]) / len(orders)
    return dict(zip([f"top{k}" for k in ks] + ["mrr"], out / len(scores)))


@pytest.mark.parametrize("seed", range(8))
def test_metrics_match_brute_force_with_ties_and_several_correct(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (3, 6), generator=g).float()
    correct = torch.rand(3, 6, generator=g) < 0.35
    correct[torch.arange(3), torch.randint(0, 6, (3,), generator=g)] = True
    got, want = retrieval_metrics(scores, correct, ks=(1, 2, 3)), brute_force(scores, correct, (1, 2, 3))
    for key, value in want.items(): assert got[key] == pytest.approx(value, abs=1e-12)
    assert got["queries"] == 3


def test_metrics_without_ties_match_an_explicit_ranking_loop():
    g = torch.Generator().manual_seed(1)
    scores, truth = torch.randn(50, 30, generator=g), torch.randint(0, 30, (50,), generator=g)
    correct = torch.zeros(50, 30, dtype=torch.bool)
    correct[torch.arange(50), truth] = True
    ranks = [1 + sum(1 for v in row if v > row[t]) for row, t in zip(scores.tolist(), truth.tolist())]
    got = retrieval_metrics(scores, correct, ks=(1, 5, 10))
    assert got["top1"] == pytest.approx(np.mean([r <= 1 for r in ranks]))
    assert got["top10"] == pytest.approx(np.mean([r <= 10 for r in ranks]))
    assert got["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))


def test_metrics_handle_minus_infinity_ties():
    scores = torch.tensor([[0.5, -math.inf, -math.inf, -math.inf]])
    correct = torch.tensor([[False, False, True, False]])
    got = retrieval_metrics(scores, correct, ks=(1, 2, 4))
    assert got["top1"] == 0.0 and got["top2"] == pytest.approx(1 / 3) and got["top4"] == 1.0
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_chance_hand_worked():
    n = 120
    assert chance_metrics(n)["top1"] == pytest.approx(1 / n, abs=1e-12)
    assert chance_metrics(n)["top5"] == pytest.approx(5 / n, abs=1e-12)
    assert chance_metrics(n)["mrr"] == pytest.approx(sum(1 / j for j in range(1, n + 1)) / n, abs=1e-12)
    # two correct of four: P(first correct at 1) = 1/2, at 2 = 1/3, at 3 = 1/6
    assert chance_metrics(4, 2)["mrr"] == pytest.approx(1 / 2 + 1 / 3 / 2 + 1 / 6 / 3)
    assert chance_metrics(4, 4, ks=(1,))["top1"] == 1.0


@pytest.mark.parametrize("n,c", [(10, 1), (120, 3), (50, 7)])
def test_chance_against_monte_carlo(n, c):
    rng = np.random.default_rng(n + c)
    trials = 40_000
    permutations = rng.random((trials, n)).argsort(1)     # candidate at each rank; candidates 0..c-1 are correct
    first = np.argmax(permutations < c, axis=1) + 1
    exact = chance_metrics(n, c)
    for key, values in (("top1", first <= 1), ("top5", first <= 5), ("mrr", 1 / first)):
        standard_error = values.std() / math.sqrt(trials)
        assert abs(exact[key] - values.mean()) <= 4 * standard_error + 1e-12


def test_chance_equals_an_all_tied_ranking():
    correct = torch.zeros(2, 9, dtype=torch.bool)
    correct[0, :2] = True; correct[1, 4] = True
    got, want = retrieval_metrics(torch.zeros(2, 9), correct), chance_metrics(9, [2, 1])
    for key in ("top1", "top5", "mrr"): assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_metric_errors_name_the_argument():
    with pytest.raises(ValueError, match="correct must mark at least one"): retrieval_metrics(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="correct must be a bool tensor"): retrieval_metrics(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="scores must be a non-empty float"): retrieval_metrics(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores must not contain NaN"): retrieval_metrics(torch.tensor([[float("nan")]]), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="ks must be"): retrieval_metrics(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), ks=())
    with pytest.raises(ValueError, match="n_correct must hold integers"): chance_metrics(3, 0)
    with pytest.raises(ValueError, match="n_candidates must be"): chance_metrics(0)


# ---------------------------------------------------------------------------------------------------------------
# Candidate sets

def domain_by_hand(name, c):
    "The generator's parameter domain, written out from SPEC §2 and tasks.sample_parameters."
    if name == "ROT90": return {(1, 0), (2, 0), (3, 0)}
    if name == "FLIP": return {(0, 0), (1, 0)}
    if name == "COLOR_SWAP": return {(a, b) for a, b in itertools.combinations(range(c), 2)}
    if name == "DRAW_BORDER": return {(a, 0) for a in range(1, c)}
    if name == "SHIFT": return {(x, y) for x in range(-2, 3) for y in range(-2, 3)} - {(0, 0)}
    return {(s, f) for s in range(1, c) for f in range(c) if f != s}


@pytest.mark.parametrize("colors", [3, 4, 5])
def test_parameter_values_are_the_generator_domain(colors):
    for name in PRIMITIVES:
        values = parameter_values(name, colors)
        assert len(values) == len(set(values)) and set(values) == domain_by_hand(name, colors)


def test_generator_draws_exactly_the_domain():
    drawn = sample_tasks(4000, "train", seed=5, lengths=(1,))
    seen = {(p, a, b) for p, (a, b) in zip(drawn.primitive[:, 0].tolist(), drawn.parameters[:, 0].tolist())}
    assert seen == {(PRIMITIVE_INDEX[n], a, b) for n in PRIMITIVES for a, b in domain_by_hand(n, 4)}


def test_all_programs_size_and_uniqueness(everything):
    assert everything.shared and everything.size == 47 + 47**2 + 47**3 == 106_079
    assert all_programs(2, num_colors=3).size == 38 + 38**2
    assert all_programs(1).size == 47
    assert len(torch.unique(program_keys(everything.tokens))) == everything.size
    lengths = (everything.primitive >= 0).sum(1)
    assert torch.bincount(lengths).tolist() == [0, 47, 47**2, 47**3]


@pytest.mark.parametrize("split", ["train", "heldout", "heldout_any", "heldout_pairs"])
def test_every_sampled_program_is_in_all_programs_exactly_once(everything, split):
    queries = sample_tasks(300, split, seed=2)
    counts = true_program_mask(queries, everything).sum(1)
    assert counts.tolist() == [1] * 300


def test_heldout_candidates_sizes_and_true_program_once(heldout):
    queries, candidates = heldout
    assert candidates.primitive.shape == (64, 120, 3) and candidates.parameters.shape == (64, 120, 3, 2)
    assert not candidates.shared and candidates.size == 120
    tokens = candidates.tokens
    for q in range(64):
        rows = [tuple(t) for t in tokens[q].tolist()]
        assert rows.count(tuple(queries.tokens[q].tolist())) == 1
        assert len(set(rows)) == 120


def test_heldout_candidates_follow_the_parameter_rules(heldout):
    queries, candidates = heldout
    table = split_compositions("heldout").tolist()
    for q in range(8):
        program, fresh = queries.program(q), {}
        for k in range(120):
            steps = decode_program(candidates.primitive[q, k], candidates.parameters[q, k])
            assert [PRIMITIVE_INDEX[s.name] for s in steps] == table[k]
            for step in steps:
                own = [s for s in program if s.name == step.name]
                if own: assert step == own[0]
                else: assert fresh.setdefault(step.name, step) == step
    steps = torch.cat([candidates.primitive.reshape(-1, 1), candidates.parameters.reshape(-1, 2)], 1).tolist()
    assert all((a, b) in domain_by_hand(PRIMITIVES[p], 4) for p, a, b in steps)


def test_heldout_any_candidates_rebuild_repeated_primitives():
    queries = sample_tasks(100, "heldout_any", seed=4)
    mask = true_program_mask(queries, heldout_candidates(queries, "heldout_any"))
    assert mask.shape == (100, 216) and mask.sum(1).tolist() == [1] * 100


def test_heldout_candidates_are_reproducible_and_errors():
    queries = sample_tasks(10, "heldout", seed=1)
    a, b = heldout_candidates(queries, seed=3), heldout_candidates(queries, seed=3)
    assert torch.equal(a.parameters, b.parameters)
    with pytest.raises(ValueError, match="split must be one of"): heldout_candidates(queries, "test")
    with pytest.raises(TypeError, match="batch must be a TaskBatch"): heldout_candidates(queries.inputs)
    with pytest.raises(ValueError, match="max_length must be"): all_programs(4)


# ---------------------------------------------------------------------------------------------------------------
# Executor and nearest neighbour

def test_executor_matches_apply_program_and_counts_ambiguity(heldout):
    queries, candidates = heldout
    executed = executor_retrieval(queries, candidates)
    assert executed.shape == (64, 120)
    for q in range(4):
        for k in range(0, 120, 5):
            program = decode_program(candidates.primitive[q, k], candidates.parameters[q, k])
            assert executed[q, k].item() == float(torch.equal(apply_program(queries.inputs[q], program), queries.outputs[q]))
    true = true_program_mask(queries, candidates)
    assert executed.bool()[true].all()
    m = executed.sum(1).double().numpy()
    strict = retrieval_metrics(executed, true)
    assert strict["top1"] == pytest.approx(np.mean(1 / m), abs=1e-12)
    assert strict["top5"] == pytest.approx(np.mean(np.minimum(5 / m, 1)), abs=1e-12)
    assert retrieval_metrics(executed, executed.bool())["top1"] == 1.0
    assert (m > 1).any()          # ambiguity exists: some queries have several reproducing programs


def test_executor_on_all_programs_subset(everything):
    queries = sample_tasks(3, "heldout", seed=8)
    executed = executor_retrieval(queries, everything, max_queries=1)
    assert executed.shape == (1, everything.size)
    assert executed[0, true_program_mask(queries[:1], everything)[0]].item() == 1.0
    g = torch.Generator().manual_seed(0)
    for k in torch.randint(0, everything.size, (40,), generator=g).tolist():
        program = decode_program(everything.primitive[k], everything.parameters[k])
        assert executed[0, k].item() == float(torch.equal(apply_program(queries.inputs[0], program), queries.outputs[0]))
    with pytest.raises(ValueError, match="max_queries must be"): executor_retrieval(queries, everything, max_queries=0)


def test_nearest_neighbour_against_a_loop():
    references = sample_tasks(400, "train", seed=3, lengths=(1,))
    queries = sample_tasks(5, "val", seed=3, lengths=(1,))
    candidates = all_programs(1)
    scores = nearest_neighbour_retrieval(queries, references, candidates)
    ref_programs = [tuple(t) for t in references.tokens.tolist()]
    for q in range(5):
        for k, program in enumerate(tuple(t) for t in candidates.tokens.tolist()):
            distances = [int((queries.inputs[q] != references.inputs[r]).sum() + (queries.outputs[q] != references.outputs[r]).sum())
                         for r in range(400) if ref_programs[r] == program]
            assert scores[q, k].item() == (-min(distances) if distances else -math.inf)


def test_nearest_neighbour_is_chance_on_heldout(heldout):
    queries, candidates = heldout
    scores = nearest_neighbour_retrieval(queries, sample_tasks(500, "train", seed=1), candidates)
    assert torch.isinf(scores).all()
    assert retrieval_metrics(scores, true_program_mask(queries, candidates)) == chance_metrics(120, [1] * 64)


# ---------------------------------------------------------------------------------------------------------------
# The dual encoder

def test_shapes_normalisation_and_scale():
    torch.manual_seed(0)
    model = DualEncoder(SMALL)
    tasks = sample_tasks(20, "train", seed=0)
    pairs, programs = model.encode_pairs(tasks.inputs, tasks.outputs), model.encode_programs(tasks.tokens)
    assert pairs.shape == programs.shape == (20, 16)
    assert torch.allclose(pairs.norm(dim=1), torch.ones(20), atol=1e-5)
    assert torch.allclose(programs.norm(dim=1), torch.ones(20), atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad(): model.logit_scale.fill_(50.0)
    assert model.scale.item() == pytest.approx(100.0, rel=1e-5)


def test_loss_equals_reference_on_its_embeddings_and_ignores_duplicates():
    torch.manual_seed(1)
    model = DualEncoder(SMALL)
    tasks = sample_tasks(40, "train", seed=2)
    keep = distinct_programs(tasks.tokens)
    rows = [tuple(t) for t in tasks.tokens.tolist()]
    assert keep.tolist() == [i for i, r in enumerate(rows) if r not in rows[:i]]
    pairs = model.encode_pairs(tasks.inputs[keep], tasks.outputs[keep])
    programs = model.encode_programs(tasks.tokens[keep])
    reference = clip_loss_reference(pairs, programs, 1 / 0.07)
    assert model.loss(tasks).item() == pytest.approx(reference.item(), abs=1e-5)
    doubled = tasks[torch.cat([torch.arange(40), torch.arange(40).flip(0)])]
    assert model.loss(doubled).item() == pytest.approx(model.loss(tasks).item(), abs=1e-6)
    model.loss(tasks).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0


def test_padding_invariance_of_encode_programs():
    torch.manual_seed(2)
    model = DualEncoder(SMALL)
    tasks = sample_tasks(60, "train", seed=3)
    one = tasks[(tasks.tokens[:, 3:] == 0).all(1)]
    two = tasks[(tasks.tokens[:, 6:] == 0).all(1) & (tasks.tokens[:, 3] != 0)]
    assert len(one) and len(two)
    assert torch.allclose(model.encode_programs(one.tokens[:, :3]), model.encode_programs(one.tokens), atol=1e-5)
    assert torch.allclose(model.encode_programs(two.tokens[:, :6]), model.encode_programs(two.tokens), atol=1e-5)
    assert torch.allclose(model.encode_programs(one.tokens[:, :3]), model.encode_programs(one.tokens[:, :5]), atol=1e-5)


def test_visual_adapter_option():
    model = DualEncoder(DualEncoderConfig(d_model=16, embed_dim=16, heads=2, pair_layers=1, program_layers=1, visual_adapter=True))
    assert type(model.pair_projection).__name__ == "SO8VisualAdapter"
    tasks = sample_tasks(5, "train", seed=0)
    assert torch.allclose(model.encode_pairs(tasks.inputs, tasks.outputs).norm(dim=1), torch.ones(5), atol=1e-5)


def test_training_batches_come_from_training_compositions_only():
    from so8lab.primitives import composition_ids
    allowed = set(composition_ids(split_compositions("train")).tolist())
    for index in range(5):
        batch = retrieval_batch(32, "train", seed=0, index=index)
        assert len(batch) == 32 and len(distinct_programs(batch.tokens)) == 32
        assert set(batch.composition.tolist()) <= allowed
        assert ((batch.primitive >= 0).sum(1) <= 2).all()


def test_seed_reproduces_training_exactly():
    def run(seed):
        model, history = train_dual_encoder(SMALL, steps=4, batch_size=16, learning_rate=1e-3, seed=seed, log_every=2)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), history
    a, history_a = run(3)
    b, history_b = run(3)
    c, _ = run(4)
    assert torch.equal(a, b) and history_a == history_b and not torch.equal(a, c)
    assert [h["step"] for h in history_a] == [2, 4]


def test_training_lowers_the_loss():
    _, history = train_dual_encoder(SMALL, steps=60, batch_size=32, learning_rate=3e-3, seed=0, log_every=20)
    assert history[-1]["loss"] < history[0]["loss"]


def test_scores_and_table(heldout):
    queries, candidates = heldout
    torch.manual_seed(0)
    model = DualEncoder(SMALL)
    scores = retrieval_scores(model, queries, candidates, batch_size=500)
    assert scores.shape == (64, 120)
    manual = model.encode_pairs(queries.inputs[3:4], queries.outputs[3:4]) @ model.encode_programs(candidates.tokens[3]).T
    assert torch.allclose(scores[3], manual[0].detach(), atol=1e-5)
    rows = retrieval_table(model, queries, sample_tasks(200, "train", seed=0), candidates, max_queries=16)
    assert [r["method"] for r in rows] == ["chance", "nearest neighbour", "executor (exact bound)", "dual encoder"]
    assert all(r["queries"] == 16 and r["candidates"] == 120 for r in rows)
    executor = rows[2]
    assert all(r["top1"] <= executor["top1"] + 1e-12 for r in rows) and executor["top1_equivalent"] == 1.0


def test_encoder_and_training_errors_name_the_argument():
    model = DualEncoder(SMALL)
    tasks = sample_tasks(4, "train", seed=0)
    with pytest.raises(ValueError, match="d_model must be divisible by heads"): DualEncoderConfig(d_model=10, heads=4)
    with pytest.raises(ValueError, match="embed_dim must be a multiple of 8"): DualEncoderConfig(embed_dim=12, visual_adapter=True)
    with pytest.raises(ValueError, match="patch_size must be one of"): DualEncoderConfig(patch_size=3)
    with pytest.raises(TypeError, match="config must be a DualEncoderConfig"): DualEncoder({"d_model": 16})
    with pytest.raises(ValueError, match="outputs has batch size 2"): model.encode_pairs(tasks.inputs, tasks.outputs[:2])
    with pytest.raises(ValueError, match="colours outside"): model.encode_pairs(tasks.inputs + 7, tasks.outputs)
    with pytest.raises(ValueError, match="tokens must have shape"): model.encode_programs(torch.zeros(4, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="batch must be a TaskBatch"): model(tasks.inputs)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"): train_dual_encoder(SMALL, batch_size=1)
    with pytest.raises(ValueError, match="log_every must be a positive integer"): train_dual_encoder(SMALL, log_every=0)
    with pytest.raises(ValueError, match="split must be one of"): train_dual_encoder(SMALL, split="everything")
    with pytest.raises(TypeError, match="candidates must be a ProgramSet"): executor_retrieval(tasks, tasks.tokens)
    with pytest.raises(ValueError, match="references must be a non-empty TaskBatch"):
        nearest_neighbour_retrieval(tasks, tasks.tokens, all_programs(1))
    with pytest.raises(TypeError, match="model must be a DualEncoder"): retrieval_scores(torch.nn.Linear(2, 2), tasks, all_programs(1))
