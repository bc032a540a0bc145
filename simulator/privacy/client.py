"""Where the client forms its upload under differential privacy (called once, by the client
handler, for every prototype strategy: the strategies never see it)."""

from __future__ import annotations

import numpy as np

from ..learner.prototypes import PrototypeSet
from ..learner.training import embed
from ..seeding import rng
from .accounting import DpPlan, make_plan
from .mechanism import noisy_class_sums, prototypes_from_sums

#: metric a client adds to its training reply when it released noisy statistics
RELEASED = "privacy.released"

_PLANS: dict[tuple, DpPlan] = {}


def plan_for(scenario, num_tasks: int) -> DpPlan | None:
    """The run's DP plan (None when DP is off); every round of every task may be a release."""
    p = scenario.privacy
    if not p.dp:
        return None
    key = (p.model_dump_json(), num_tasks, scenario.training.rounds_per_task)
    if key not in _PLANS:
        _PLANS[key] = make_plan(p, num_tasks * scenario.training.rounds_per_task)
    return _PLANS[key]


def private_prototypes(
    scenario, num_tasks: int, model, x: np.ndarray, y: np.ndarray, seen: list[int], *,
    pid: int, task: int, rnd: int, device,
) -> PrototypeSet | None:
    """The prototypes this client may upload under DP: noisy sums of clipped embeddings and
    noisy counts of every seen class, post-processed into means. None when DP is off."""
    plan = plan_for(scenario, num_tasks)
    if plan is None:
        return None
    with np.errstate(all="ignore"):
        emb = embed(model, x, device).detach().cpu().numpy()
    classes = np.array(sorted(set(int(c) for c in seen) | set(int(c) for c in np.unique(y))), dtype=np.int64)
    gen = rng(scenario.seed, "privacy_noise", pid, task, rnd)
    sums, counts = noisy_class_sums(emb, y, classes, plan.clip, plan.scales, gen)
    return prototypes_from_sums(classes, sums, counts)
