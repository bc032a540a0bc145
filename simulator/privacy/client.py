"""Where the client forms its upload under differential privacy (called once, by the client
handler, for every prototype strategy: the strategies never see it), and where it gets DP-SGD
for its local training when the strategy uploads weights."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..learner.prototypes import PrototypeSet
from ..learner.training import embed
from ..seeding import derive_seed, rng
from .accounting import DpPlan, make_plan
from .dp_sgd import PrivateTraining
from .mechanism import noisy_class_sums, prototypes_from_sums

#: metric a client adds to its training reply when it released noisy statistics
RELEASED = "privacy.released"
#: metric: the DP-SGD steps a client took in this round
SGD_STEPS = "privacy.sgd_steps"

_PLANS: dict[tuple, DpPlan] = {}


def uses_dp_sgd(scenario) -> bool:
    """Whether the run's strategy uploads model weights, which DP-SGD then protects."""
    from strategies import STRATEGIES

    cls = STRATEGIES[scenario.strategy.name]
    return bool(cls.weight_sharing(cls.Params.model_validate(scenario.strategy.params)))


def uploads_prototypes(scenario) -> bool:
    """Whether the run's clients upload prototypes (FedAvg-like methods send weights only, so
    under DP they release nothing but their DP-SGD steps)."""
    from strategies import STRATEGIES

    return bool(STRATEGIES[scenario.strategy.name].Objective.uploads_prototypes)


def plan_for(scenario, num_tasks: int) -> DpPlan | None:
    """The run's DP plan (None when DP is off); every round of every task may be a release
    (and, for strategies that upload weights, a round of DP-SGD)."""
    p = scenario.privacy
    if not p.dp:
        return None
    sgd_epochs = scenario.training.local_epochs if uses_dp_sgd(scenario) else None
    rounds = num_tasks * scenario.training.rounds_per_task
    releases = rounds if uploads_prototypes(scenario) else 0
    batch = scenario.training.batch_size
    key = (p.model_dump_json(), num_tasks, scenario.training.rounds_per_task, sgd_epochs, releases, batch)
    if key not in _PLANS:
        plan = make_plan(p, rounds, sgd_epochs, releases=releases)
        if plan.sgd is not None:  # DP-SGD normalises by the public batch size, not Opacus' q x n (dp_sgd.py)
            plan = dataclasses.replace(plan, sgd=dataclasses.replace(plan.sgd, divisor=float(batch)))
        _PLANS[key] = plan
    return _PLANS[key]


def private_training(scenario, num_tasks: int, *, pid: int, task: int, rnd: int) -> PrivateTraining | None:
    """DP-SGD for this client's local training this round (None: plain SGD)."""
    plan = plan_for(scenario, num_tasks)
    if plan is None or plan.sgd is None:
        return None
    return PrivateTraining(plan.sgd, derive_seed(scenario.seed, "dp_sgd", pid, task, rnd))


def private_prototypes(
    scenario, num_tasks: int, model, x: np.ndarray, y: np.ndarray, classes: list[int], *,
    pid: int, task: int, rnd: int, device,
) -> PrototypeSet | None:
    """The prototypes this client may upload under DP: noisy sums of clipped embeddings and
    noisy counts of every class in ``classes``, post-processed into means. None when DP is off.

    ``classes`` must be public: the classes the client may hold this round by the schedule alone
    (its task's classes; replay memory is refused under DP), never the classes it actually holds,
    so an absent class is released too (as noise) and presence leaks nothing. A sample of any
    other class is an error."""
    plan = plan_for(scenario, num_tasks)
    if plan is None:
        return None
    if len(y) == 0:  # a client with nothing to train on still releases (pure noise): its silence would tell
        emb = np.zeros((0, scenario.model.feature_dim), dtype=np.float64)
    else:
        with np.errstate(all="ignore"):
            emb = embed(model, x, device).detach().cpu().numpy()
    public = np.array(sorted(set(int(c) for c in classes)), dtype=np.int64)
    gen = rng(scenario.seed, "privacy_noise", pid, task, rnd)
    sums, counts = noisy_class_sums(emb, y, public, plan.clip, plan.scales, gen)
    return prototypes_from_sums(public, sums, counts)
