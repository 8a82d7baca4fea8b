"""Tests of the evaluation metrics and calibration rows of so8lab.training against independent references: brute-force
loops over samples and cells for the overall, per-composition and per-length numbers, hand-worked programs for the
one-step-dropped oracles, an independent count for all-background, direct forward passes for the model rows."""
import math
from dataclasses import fields, replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from so8lab.models import GridModel, ModelConfig
from so8lab.primitives import PRIMITIVE_INDEX, Step, apply_program, composition_ids
from so8lab.tasks import TaskBatch, sample_tasks
from so8lab.training import (CALIBRATIONS, MODEL_CALIBRATIONS, _derangement, calibration_predictions, calibration_table,
                             evaluate, evaluate_predictions)

METRICS = ("iou", "accuracy", "exact_match", "changed_accuracy")


# ---------------------------------------------------------------- references
def concatenate(*batches):
    "One TaskBatch holding the samples of `batches` in order."
    return TaskBatch(**{f.name: None if getattr(batches[0], f.name) is None else torch.cat([getattr(b, f.name) for b in batches])
                        for f in fields(TaskBatch)})


def mixed_tasks(n=60):
    "Tasks of lengths 1-3 (train and held-out programs)."
    return concatenate(sample_tasks(n, "train", seed=11), sample_tasks(n // 2, "heldout", seed=12))


def sample_metrics(prediction, target, source):
    "iou, accuracy, exact_match, changed_accuracy of one grid by loops over cells (lists of lists); NaN when nothing changed."
    cells = [(r, c) for r in range(len(target)) for c in range(len(target[0]))]
    ious = []
    for colour in {target[r][c] for r, c in cells} | {prediction[r][c] for r, c in cells}:
        p = {cell for cell in cells if prediction[cell[0]][cell[1]] == colour}
        t = {cell for cell in cells if target[cell[0]][cell[1]] == colour}
        ious.append(len(p & t) / len(p | t))
    right = [prediction[r][c] == target[r][c] for r, c in cells]
    changed = [(r, c) for r, c in cells if target[r][c] != source[r][c]]
    changed_right = [prediction[r][c] == target[r][c] for r, c in changed]
    return {"iou": sum(ious) / len(ious), "accuracy": sum(right) / len(cells), "exact_match": float(all(right)),
            "changed_accuracy": sum(changed_right) / len(changed) if changed else math.nan}


def mean_without_nan(values):
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def reference_metrics(predictions, tasks):
    "Overall, per-composition and per-length metrics by a loop over samples."
    rows, groups = [], {"by_composition": {}, "by_length": {}}
    p, t, x = predictions.tolist(), tasks.outputs.tolist(), tasks.inputs.tolist()
    for i in range(len(tasks)):
        row = sample_metrics(p[i], t[i], x[i])
        rows.append(row)
        length = sum(1 for step in tasks.primitive[i].tolist() if step != -1)
        for table, key in (("by_composition", str(int(tasks.composition[i]))), ("by_length", str(length))):
            groups[table].setdefault(key, []).append(row)
    def summary(members): return {name: mean_without_nan([m[name] for m in members]) for name in METRICS}
    return summary(rows), {table: {key: {"n": len(members), **summary(members)} for key, members in entries.items()}
                           for table, entries in groups.items()}


def assert_close(actual, expected, tolerance=1e-6):
    if math.isnan(expected): assert math.isnan(actual)
    else: assert abs(actual - expected) < tolerance, (actual, expected)


def assert_matches_reference(result, predictions, tasks):
    overall, tables = reference_metrics(predictions, tasks)
    for name in METRICS: assert_close(result[name], overall[name])
    for table in ("by_composition", "by_length"):
        assert result[table].keys() == tables[table].keys()
        for key, expected in tables[table].items():
            assert result[table][key]["n"] == expected["n"] and set(result[table][key]) == {"n", *METRICS}
            for name in METRICS: assert_close(result[table][key][name], expected[name])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GridModel(ModelConfig(d_model=32, bottleneck_dim=32, layers=2, heads=2, sae_width=64)).eval()


class Recorder(torch.nn.Module):
    "A model without `forward_batch`: logits paint each grid with the colour (first token mod 4); it keeps the tokens it saw."
    def __init__(self): super().__init__(); self.scale = torch.nn.Parameter(torch.ones(())); self.seen = []
    def forward(self, inputs, tokens, demo_inputs=None, demo_outputs=None):
        self.seen.append(tokens.clone())
        colour = torch.nn.functional.one_hot(tokens[:, 0] % 4, 4).float()          # [B, 4]
        return self.scale * colour[:, :, None, None].expand(-1, -1, 8, 8)


# ---------------------------------------------------------------- metrics
@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), noise=st.sampled_from([0.0, 0.02, 0.2]))
def test_evaluate_predictions_matches_loop_over_samples(seed, noise):
    tasks = mixed_tasks(40)
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, 3, (len(tasks), 1, 1), generator=generator)        # target, input or noisy target
    noisy = torch.where(torch.rand(len(tasks), 8, 8, generator=generator) < noise, torch.randint(0, 4, (len(tasks), 8, 8), generator=generator),
                        tasks.outputs.long())
    predictions = torch.where(choice == 0, tasks.outputs.long(), torch.where(choice == 1, tasks.inputs.long(), noisy))
    result = evaluate_predictions(predictions, tasks, by_composition=True)
    assert list(result) == [*METRICS, "by_composition", "by_length"]
    assert_matches_reference(result, predictions, tasks)
    assert set(evaluate_predictions(predictions, tasks)) == set(METRICS)


def test_groups_with_no_changed_cell_have_nan_changed_accuracy():
    tasks = sample_tasks(20, "train", seed=4)
    identity = replace(tasks, outputs=torch.where(torch.arange(20)[:, None, None] < 5, tasks.inputs, tasks.outputs))
    result = evaluate_predictions(identity.outputs.long(), identity, by_composition=True)
    assert_matches_reference(result, identity.outputs.long(), identity)
    assert result["changed_accuracy"] == 1.0
    only_identity = evaluate_predictions(identity.inputs[:5].long(), identity[:5])
    assert math.isnan(only_identity["changed_accuracy"]) and only_identity["exact_match"] == 1.0


def test_evaluate_matches_loop_direct_forward_and_cross_entropy():
    tasks, model = mixed_tasks(50), tiny_model().train()
    result = evaluate(model, tasks, batch_size=13, by_composition=True)
    assert model.training                                                   # mode restored
    assert list(result) == [*METRICS, "loss", "by_composition", "by_length"]
    with torch.no_grad(): logits = model.eval()(tasks.inputs, tasks.tokens).logits
    assert_matches_reference(result, logits.argmax(1), tasks)
    assert_close(result["loss"], torch.nn.functional.cross_entropy(logits, tasks.outputs.long()).item(), 1e-5)
    plain = evaluate(model, tasks)
    assert list(plain) == [*METRICS, "loss"]
    for name in (*METRICS, "loss"): assert_close(plain[name], result[name], 1e-5)
    assert {str(length) for length in (1, 2, 3)} == set(result["by_length"])
    assert set(result["by_composition"]) == {str(c) for c in composition_ids(tasks.primitive).tolist()}


def test_evaluate_accepts_a_model_called_with_inputs_and_tokens():
    tasks = sample_tasks(30, "train", seed=2)
    result = evaluate(Recorder(), tasks, batch_size=8)
    predictions = (tasks.tokens[:, 0] % 4)[:, None, None].expand(-1, 8, 8)
    reference, _ = reference_metrics(predictions, tasks)
    for name in METRICS: assert_close(result[name], reference[name])


def test_evaluation_errors_name_the_argument():
    tasks = sample_tasks(4, "train")
    with pytest.raises(TypeError, match="predictions must be an integer tensor"): evaluate_predictions(tasks.outputs.float(), tasks)
    with pytest.raises(ValueError, match="predictions must have the shape of targets"): evaluate_predictions(tasks.outputs[:, :4], tasks)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"): evaluate(tiny_model(), tasks, batch_size=0)


# ---------------------------------------------------------------- calibration rows
def test_all_background_exact_match_is_the_fraction_of_all_zero_targets():
    tasks = sample_tasks(60, "heldout", seed=3)
    zeroed = replace(tasks, outputs=torch.where(torch.arange(60)[:, None, None] % 4 == 0, 0, tasks.outputs))
    all_zero = sum(all(v == 0 for row in grid for v in row) for grid in zeroed.outputs.tolist())
    assert all_zero >= 15
    row = calibration_table(zeroed, kinds=["all_background"])["all_background"]
    assert abs(row["exact_match"] - all_zero / 60) < 1e-12
    assert calibration_predictions(zeroed, "all_background").dtype == torch.long


def test_copy_input_gets_no_changed_cell_right():
    tasks = mixed_tasks(60)
    copy = calibration_predictions(tasks, "copy_input")
    assert torch.equal(copy, tasks.inputs.long())
    row = evaluate_predictions(copy, tasks, by_composition=True)
    assert row["changed_accuracy"] == 0.0 and all(r["changed_accuracy"] == 0.0 for r in row["by_composition"].values())


def hand_batch(program, grid):
    "A one-sample TaskBatch of `program` (list of (name, p1, p2)) on `grid` (only the fields the oracles read are real)."
    primitive = torch.tensor([[PRIMITIVE_INDEX[name] for name, _, _ in program] + [-1] * (3 - len(program))])
    parameters = torch.tensor([[[a, b] for _, a, b in program] + [[0, 0]] * (3 - len(program))])
    n = torch.zeros(1, dtype=torch.long)
    return TaskBatch(grid[None], grid[None], primitive, parameters, torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 6), n, n)


def test_drop_oracles_on_hand_worked_programs():
    grid = torch.zeros(8, 8, dtype=torch.uint8); grid[3, 1] = 1; grid[6, 6] = 3
    flipped = [row[::-1] for row in grid.tolist()]                                # FLIP horizontal: reverse columns
    bordered = [[2 if r in (0, 7) or c in (0, 7) else v for c, v in enumerate(row)] for r, row in enumerate(grid.tolist())]
    flipped_bordered = [[2 if r in (0, 7) or c in (0, 7) else v for c, v in enumerate(row)] for r, row in enumerate(flipped)]
    def shift_right(rows): return [[0] + row[:-1] for row in rows]              # SHIFT dx=1, dy=0
    program = [("FLIP", 1, 0), ("DRAW_BORDER", 2, 0), ("SHIFT", 1, 0)]
    tasks = hand_batch(program, grid)
    assert calibration_predictions(tasks, "drop_first_step")[0].tolist() == shift_right(bordered)
    assert calibration_predictions(tasks, "drop_last_step")[0].tolist() == flipped_bordered
    two = hand_batch(program[:2], grid)
    assert calibration_predictions(two, "drop_first_step")[0].tolist() == bordered
    assert calibration_predictions(two, "drop_last_step")[0].tolist() == flipped
    for kind in ("drop_first_step", "drop_last_step"):
        assert calibration_predictions(hand_batch(program[:1], grid), kind)[0].tolist() == grid.tolist()


def test_drop_oracles_match_a_loop_of_apply_program():
    tasks = mixed_tasks(30)
    first, last = (calibration_predictions(tasks, kind) for kind in ("drop_first_step", "drop_last_step"))
    for i in range(len(tasks)):
        steps = tasks.program(i)
        assert torch.equal(apply_program(tasks.inputs[i], steps).long(), tasks.outputs[i].long())    # the oracle's program is the true one
        assert torch.equal(first[i], apply_program(tasks.inputs[i], steps[1:]).long())
        assert torch.equal(last[i], apply_program(tasks.inputs[i], steps[:-1]).long())


@settings(max_examples=40)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_derangement_moves_every_sample_and_prefers_another_composition(counts, seed):
    composition = torch.tensor([label for label, count in enumerate(counts) for _ in range(count)])
    composition = composition[torch.randperm(len(composition), generator=torch.Generator().manual_seed(seed))]
    if len(composition) < 2:
        with pytest.raises(ValueError, match="at least 2 samples"): _derangement(composition, seed)
        return
    partner = _derangement(composition, seed)
    assert sorted(partner.tolist()) == list(range(len(composition)))
    assert all(partner[i] != i for i in range(len(composition)))
    if max(counts) <= len(composition) / 2: assert all(composition[partner[i]] != composition[i] for i in range(len(composition)))
    assert torch.equal(partner, _derangement(composition, seed))


def test_shuffled_tokens_feed_the_model_deranged_tokens():
    tasks = mixed_tasks(40)
    model = Recorder()
    predictions = calibration_predictions(tasks, "shuffled_tokens", model, seed=5, batch_size=16)
    seen = torch.cat(model.seen)
    partner = _derangement(tasks.composition, 5)
    assert all(partner[i] != i for i in range(len(tasks)))
    assert torch.equal(seen, tasks.tokens[partner])
    assert torch.equal(predictions, (seen[:, 0] % 4)[:, None, None].expand(-1, 8, 8))
    assert not torch.equal(calibration_predictions(tasks, "shuffled_tokens", Recorder(), seed=6), predictions)


def test_empty_program_is_a_forward_with_padding_tokens():
    tasks, model = sample_tasks(40, "heldout", seed=7), tiny_model(1)
    with torch.no_grad(): direct = model(tasks.inputs, torch.zeros_like(tasks.tokens)).logits.argmax(1)
    assert torch.equal(calibration_predictions(tasks, "empty_program", model, batch_size=9), direct)
    recorder = Recorder()
    calibration_predictions(tasks, "empty_program", recorder)
    assert (torch.cat(recorder.seen) == 0).all()


def test_calibration_table_rows_and_errors():
    tasks, model = sample_tasks(30, "heldout", seed=8), tiny_model()
    assert list(calibration_table(tasks)) == [k for k in CALIBRATIONS if k not in MODEL_CALIBRATIONS]
    table = calibration_table(tasks, model, by_composition=True)
    assert list(table) == list(CALIBRATIONS) and set(table["empty_program"]) == {*METRICS, "by_composition", "by_length"}
    for kind in CALIBRATIONS:
        assert_matches_reference(table[kind], calibration_predictions(tasks, kind, model), tasks)
    with pytest.raises(ValueError, match="model is required"): calibration_predictions(tasks, "shuffled_tokens")
    with pytest.raises(ValueError, match="kind must be one of"): calibration_predictions(tasks, "oracle")
    with pytest.raises(ValueError, match="kinds must be one of"): calibration_table(tasks, kinds=["oracle"])
