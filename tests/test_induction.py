"""Tests of so8lab.induction (issue 14, H5 as a study) and of the MultimodalSO8T fusion it compares.

References are independent of the module: Python loops of `apply_program` over decoded programs, the executor run
again on the stored equivalence lists, the definition of the metrics (a superset of hits cannot rank lower), and a
state-dict round trip of the fused model."""
import numpy as np
import pytest
import torch

from so8lab.adapters import MultimodalSO8T, build_model
from so8lab.induction import (CANDIDATE_SETS, DEMO_METHODS, RETRIEVAL_SPLITS, calibration_job, candidate_set, demonstrations,
                              induction_accuracy, retrieval_job, retrieval_tasks)
from so8lab.models import ModelConfig
from so8lab.primitives import apply_program, decode_program
from so8lab.retrieval import executor_retrieval
from so8lab.runner import run_job
from so8lab.tasks import sample_tasks


@pytest.mark.parametrize("fusion", ["so8t", "so8t_resampler"])
def test_fused_model_round_trips_through_its_state_dict(fusion):
    "build_model rebuilds the same MultimodalSO8T from the config; loading the state dict reproduces its outputs exactly."
    config = ModelConfig(conditioning="demo", fusion=fusion, d_model=32, bottleneck_dim=16, layers=2, heads=4, sae_width=24, patch_size=2)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for gate in model.cross_attention: gate.alpha.fill_(0.5)    # open the gates: the demonstration is read
    again = build_model(config).eval()
    again.load_state_dict(model.state_dict())
    tasks = sample_tasks(5, with_demo=True, seed=2)
    assert isinstance(again, MultimodalSO8T) and (again.resampler is None) == (fusion == "so8t")
    with torch.no_grad(): assert torch.equal(model.forward_batch(tasks).logits, again.forward_batch(tasks).logits)


def test_induction_accuracy_of_random_scores_matches_a_loop():
    "Random integer scores (many ties) on held-out tasks: the accuracy of a uniform pick among the top equals a loop."
    tasks = sample_tasks(10, "heldout", seed=4, with_demo=True)
    candidates = candidate_set("split", demonstrations(tasks), "heldout")
    scores = torch.randint(0, 4, (10, candidates.size), generator=torch.Generator().manual_seed(1)).float()
    expected = []
    for q in range(10):
        top = (scores[q] == scores[q].max()).nonzero().flatten().tolist()
        solved = [torch.equal(apply_program(tasks.inputs[q], decode_program(candidates.primitive[q, k], candidates.parameters[q, k])),
                              tasks.outputs[q]) for k in top]
        expected.append(np.mean(solved))
    np.testing.assert_allclose(induction_accuracy(scores, tasks, candidates), expected, atol=1e-12)


@pytest.fixture(scope="module")
def smoke_records(tmp_path_factory):
    "A smoke calibration of every split and one proposed dual encoder, computed once."
    folder = tmp_path_factory.mktemp("h5")
    job = retrieval_job("proposed", 0, "smoke", folder)
    return [run_job(calibration, "cpu") for calibration in job.inputs], run_job(job, "cpu")


def test_stored_equivalents_are_what_the_executor_finds(smoke_records):
    "The equivalence lists a calibration stores equal a fresh executor run on the first demonstrations of each split."
    calibrations, _ = smoke_records
    for calibration in calibrations:
        pairs = demonstrations(retrieval_tasks(calibration["split"], "smoke")[:8])
        executed = executor_retrieval(pairs, candidate_set("split", pairs, calibration["split"]))
        assert [row.nonzero().flatten().tolist() for row in executed] == calibration["sets"]["split"]["equivalent"][:8]


def test_dual_encoder_record_is_consistent(smoke_records):
    "Counting equivalents never lowers a metric; the competence is val top-1 with equivalents; every split and set is scored."
    calibrations, record = smoke_records
    assert set(record["retrieval"]) == set(RETRIEVAL_SPLITS) and all(set(v) == set(CANDIDATE_SETS) for v in record["retrieval"].values())
    for split, sets in record["retrieval"].items():
        for kind, metrics in sets.items():
            assert metrics["top1_equivalent"] >= metrics["top1"] - 1e-12 and metrics["mrr_equivalent"] >= metrics["mrr"] - 1e-12
            assert 0 <= metrics["induction"] <= 1
            assert metrics["queries"] == (200 if kind == "split" else 2)
    assert record["competence"]["val_top1_equivalent"] == record["retrieval"]["val"]["split"]["top1_equivalent"]
    assert record["competence"]["passed"] is (record["competence"]["val_top1_equivalent"] >= 0.95)
    assert all(row["share"] > 0 for row in record["history"])        # the proposed encoder trains with the share loss


def test_prepare_records_trains_demo_models_up_front_then_calibrations_then_models(tmp_path, monkeypatch):
    "The H5 path of `so8lab.reports.prepare_records`: demonstration models first, then the calibrations every other H5 job reads."
    import so8lab.reports as reports
    calls = []
    monkeypatch.setattr(reports, "run_many", lambda methods, seeds, *args, **options: calls.append(("train", tuple(methods))) or [])
    monkeypatch.setattr(reports, "run_jobs", lambda jobs, *args, **options: calls.append(("jobs", [job.name for job in jobs])) or [])
    reports.prepare_records(["H5_retrieval"], "smoke", tmp_path, {"seeds": [0, 1]}, log=False)
    assert calls == [("train", ("proposed", "B0", *DEMO_METHODS)), ("train", DEMO_METHODS),
                     ("jobs", ["calibration-val", "calibration-heldout_pairs", "calibration-heldout"]),
                     ("jobs", ["neighbour-seed0", "neighbour-seed1", "proposed-seed0", "proposed-seed1", "B0-seed0", "B0-seed1"])]


def test_jobs_name_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"): calibration_job("train", "smoke", tmp_path)
    with pytest.raises(ValueError, match="method must be one of"): retrieval_job("demo", 0, "smoke", tmp_path)
    with pytest.raises(ValueError, match="has no H5 settings"): retrieval_job("B0", 0, "pilot", tmp_path)
