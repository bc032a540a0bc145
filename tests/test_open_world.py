"""Open-world evaluation: the ranking metrics (AUROC, FPR at 95% TPR) against closed forms and
hand-computed cases, the two scores on hand-made embeddings, the server's averaging, and runs
whose metrics.csv and summary.json carry the per-task values and their mean."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from flwr.app import MetricRecord

from simulator.engine.recorder import open_world_means
from simulator.engine.runner import run_scenario
from simulator.learner.open_world import msp_scores, open_world_scores, prototype_scores
from simulator.learner.prototypes import PrototypeSet
from simulator.metrics import open_world_auroc, open_world_fpr95, open_world_metrics, open_world_summary
from simulator.scenario import validate_scenario

from helpers import run_tiny

REPO = Path(__file__).resolve().parents[1]
KEYS = ("open_world_auroc", "open_world_fpr95")


# --------------------------------------------------------------------------- ranking metrics
def test_a_perfect_scorer_has_auroc_one_and_fpr95_zero():
    known, unknown = np.linspace(0.6, 1.0, 50), np.linspace(-1.0, 0.5, 30)
    assert open_world_auroc(known, unknown) == 1.0
    assert open_world_fpr95(known, unknown) == 0.0
    # the reversed ranking: every unknown sample outranks every known one
    assert open_world_auroc(unknown, known) == 0.0
    assert open_world_fpr95(unknown, known) == 1.0


def test_a_scorer_independent_of_the_label_has_auroc_near_one_half():
    # 2,000 + 2,000 samples: the AUROC's standard deviation is sqrt((n+m+1)/(12nm)) = 0.0091;
    # over seeds 0..199 the largest |AUROC - 0.5| measured was 0.024, the margin is 0.05
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scores = rng.normal(size=4000)
        labels = rng.permutation(np.repeat([True, False], 2000))
        auroc = open_world_auroc(scores[labels], scores[~labels])
        assert abs(auroc - 0.5) < 0.05, (seed, auroc)


def mann_whitney_auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(s_known > s_unknown) + 0.5 P(s_known == s_unknown), over every pair."""
    diff = known[:, None] - unknown[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_the_mann_whitney_closed_form(seed):
    rng = np.random.default_rng(seed)
    # rounded scores so that ties between known and unknown samples occur
    known = np.round(rng.normal(0.4, 1.0, size=137), 1)
    unknown = np.round(rng.normal(0.0, 1.0, size=91), 1)
    assert (known[:, None] == unknown[None, :]).any()
    assert open_world_auroc(known, unknown) == pytest.approx(mann_whitney_auroc(known, unknown), abs=1e-12)


def brute_force_fpr95(known: np.ndarray, unknown: np.ndarray) -> float:
    """Smallest FPR over every threshold "score >= t" whose TPR is at least 0.95."""
    best = 1.0
    for t in np.unique(np.concatenate([known, unknown])):
        if (known >= t).mean() >= 0.95:
            best = min(best, float((unknown >= t).mean()))
    return best


def test_fpr95_of_a_hand_computed_case():
    # 20 known samples 10..29: TPR >= 0.95 needs 19 of them, i.e. a threshold at most 11;
    # at "score >= 11" the unknown samples 12 and 30 pass: FPR 2/5 (at ">= 10", 10.5 too: 3/5)
    known = np.arange(10, 30, dtype=float)
    unknown = np.array([0.0, 5.0, 10.5, 12.0, 30.0])
    assert open_world_fpr95(known, unknown) == pytest.approx(0.4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr95_equals_a_brute_force_over_thresholds(seed):
    rng = np.random.default_rng(seed)
    known = np.round(rng.normal(1.0, 1.0, size=200), 1)
    unknown = np.round(rng.normal(0.0, 1.0, size=150), 1)
    assert open_world_fpr95(known, unknown) == pytest.approx(brute_force_fpr95(known, unknown), abs=1e-12)


def test_no_value_without_both_sides_or_with_a_non_finite_score():
    assert math.isnan(open_world_auroc([0.5, 0.7], []))
    assert math.isnan(open_world_fpr95([], [0.1]))
    assert all(math.isnan(v) for v in open_world_metrics([0.5, np.nan], [0.1]).values())


def test_the_run_figure_is_the_mean_over_tasks_before_the_last():
    assert open_world_summary([0.6, np.nan, 0.8, 0.99], num_tasks=4) == pytest.approx(0.7)
    assert open_world_summary([0.6, 0.8], num_tasks=4) == pytest.approx(0.7)  # an unfinished run
    assert math.isnan(open_world_summary([np.nan, np.nan, 0.9], num_tasks=3))
    assert math.isnan(open_world_summary([0.9], num_tasks=1))


# --------------------------------------------------------------------------- scores
def test_prototype_score_is_the_cosine_to_the_closest_prototype():
    protos = PrototypeSet([0, 1], np.array([[1.0, 0.0], [0.0, 2.0]]), [5, 5])
    feats = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    # [3,4]: cos 0.6 with [1,0], 0.8 with [0,2]; [-1,0]: -1 and 0; zero vector: 0; [-1,-1]: -0.707 twice
    expected = [0.8, 0.0, 0.0, -math.sqrt(0.5)]
    assert prototype_scores(feats, protos) == pytest.approx(expected, abs=1e-12)


def test_msp_is_the_softmax_maximum_over_the_seen_classes_only():
    logits = torch.tensor([[2.0, 0.0, 100.0], [1.0, 1.0, -5.0]])
    # class 2 is not seen: it takes no part; e^2 / (e^2 + 1) and a tie at one half
    assert msp_scores(logits, [0, 1]) == pytest.approx([math.exp(2) / (math.exp(2) + 1), 0.5], abs=1e-12)


def test_open_world_scores_follow_the_inference_and_the_seen_classes():
    protos = PrototypeSet([0, 1, 2], np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), [1, 1, 1])
    feats = torch.tensor([[-2.0, 0.0], [1.0, 1.0]])
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    model = SimpleNamespace(head=head)
    # prototypes: class 2 (the only one [-2,0] resembles) is not seen yet
    by_proto = open_world_scores(model, feats, inference="prototype", seen_classes=[0, 1], protos=protos)
    assert by_proto == pytest.approx([0.0, math.sqrt(0.5)], abs=1e-6)
    # head: logits [-2, 0, -10] and [1, 1, 10]; the softmax covers classes 0 and 1
    by_head = open_world_scores(model, feats, inference="head", seen_classes=[0, 1], protos=None)
    assert by_head == pytest.approx([1 / (1 + math.exp(-2)), 0.5], abs=1e-6)
    # no prototype of a seen class: no score
    assert open_world_scores(model, feats, inference="prototype", seen_classes=[3], protos=protos) is None
    assert open_world_scores(model, feats, inference="prototype", seen_classes=[0], protos=None) is None


def test_the_server_averages_over_the_clients_with_a_finite_value():
    replies = [MetricRecord({"partition_id": 0, "open_world_auroc": 0.9, "open_world_fpr95": 0.2}),
               MetricRecord({"partition_id": 1, "open_world_auroc": 0.7, "open_world_fpr95": 0.6}),
               MetricRecord({"partition_id": 2})]  # this client gave no value
    assert open_world_means(replies) == pytest.approx({"open_world_auroc": 0.8, "open_world_fpr95": 0.4})
    assert all(math.isnan(v) for v in open_world_means([MetricRecord({"partition_id": 0})]).values())


# --------------------------------------------------------------------------- runs
def check_run(run_dir: Path, num_tasks: int) -> pd.DataFrame:
    """The per-task values of a run (last round of each task), checked against the summary:
    finite before the last task, NaN at it, the summary their mean; returns them."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = metrics[metrics["eval_task"].notna()]
    last_round = rows[rows["round"] == rows.groupby("task")["round"].transform("max")]
    per_task = last_round.groupby("task")[list(KEYS)].agg(["min", "max"])
    for key in KEYS:
        assert np.array_equal(per_task[(key, "min")], per_task[(key, "max")], equal_nan=True)  # one per evaluation
        values = per_task[(key, "min")]
        assert len(values) == num_tasks
        assert np.isfinite(values.iloc[:-1]).all() and np.isnan(values.iloc[-1]), (key, values.tolist())
        assert summary[key] == pytest.approx(values.iloc[:-1].mean(), abs=1e-12)
    assert ((per_task[("open_world_auroc", "min")].iloc[:-1]).between(0, 1)).all()
    earlier = rows[rows["round"] != rows.groupby("task")["round"].transform("max")]
    assert earlier[list(KEYS)].isna().all().all()  # only the evaluation that fills a matrix row scores
    return per_task.xs("min", axis=1, level=1)


@pytest.mark.parametrize("strategy", ["proto_avg", "finetune"])
def test_the_quickstart_records_open_world_values_per_task_and_their_mean(tmp_path, strategy):
    raw = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    raw["training"].update(rounds_per_task=2, local_epochs=1)
    raw["strategy"] = {"name": strategy, "params": raw["strategy"]["params"] if strategy == "proto_avg" else {}}
    out = run_scenario(validate_scenario(raw), run_dir=tmp_path / strategy, engine="inline", out=None)
    values = check_run(out.run_dir, num_tasks=4)
    # far from chance on mnist1d for a prototype method (measured 0.58-0.65 with 3 rounds)
    if strategy == "proto_avg":
        assert values["open_world_auroc"].iloc[:-1].mean() > 0.5


def test_a_method_trained_on_every_task_from_the_start_has_no_unknown_classes(tmp_path):
    out = run_tiny(tmp_path, "joint", strategy={"name": "joint", "params": {}})
    metrics = pd.read_csv(out.run_dir / "metrics.csv")
    assert metrics[list(KEYS)].isna().all().all()
    assert all(out.summary[k] is None or math.isnan(out.summary[k]) for k in KEYS)
    saved = json.loads((out.run_dir / "summary.json").read_text())
    assert saved["open_world_auroc"] is None and saved["open_world_fpr95"] is None


def test_population_learned_scores_each_client_on_the_tasks_it_has_learned(tmp_path):
    # client 2 joins at step 1: at step 0 it is not evaluated, at step 1 it has learned task 1
    # only, so under population "learned" its positives are task 1's samples alone
    over = dict(clients__arrival={"at_task": [0, 0, 1]}, training__rounds_per_task=1)
    everyone = run_tiny(tmp_path, "all", **over)
    learned = run_tiny(tmp_path, "learned", evaluation={"population": "learned"}, **over)
    assert np.array_equal(everyone.matrix[:2, :2][np.tril_indices(2)], learned.matrix[:2, :2][np.tril_indices(2)])
    a, b = check_run(everyone.run_dir, num_tasks=3), check_run(learned.run_dir, num_tasks=3)
    assert a["open_world_auroc"].iloc[0] == b["open_world_auroc"].iloc[0]
    assert a["open_world_auroc"].iloc[1] != b["open_world_auroc"].iloc[1]


def test_open_world_can_be_turned_off(tmp_path):
    """evaluation.open_world: false: no open-world column values and no summary figure, the same
    accuracies (the scores never change a prediction)."""
    from helpers import tiny

    on = run_scenario(validate_scenario(tiny()), run_dir=tmp_path / "on", out=None, plots=False)
    off = run_scenario(validate_scenario(tiny(evaluation={"open_world": False})), run_dir=tmp_path / "off", out=None, plots=False)
    assert (tmp_path / "on" / "accuracy_matrix.csv").read_bytes() == (tmp_path / "off" / "accuracy_matrix.csv").read_bytes()
    assert np.isfinite(on.summary["open_world_auroc"])
    assert off.summary["open_world_auroc"] is None or not np.isfinite(off.summary["open_world_auroc"])
    assert pd.read_csv(tmp_path / "off" / "metrics.csv")["open_world_auroc"].isna().all()
