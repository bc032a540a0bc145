"""Privacy at the run level: checks before a run starts, release counting during it, the
epsilon spent in its summary."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..errors import Problem, UserError
from .accounting import AccountantMissing, BudgetExceeded, epsilon_spent
from .client import RELEASED, plan_for

#: why a strategy's merge cannot run on a securely aggregated sum
NOT_A_SUM = {
    "fedtgp": "FedTGP trains its global prototypes on the server from each client's own prototypes",
    "fpl": "FPL clusters each client's prototypes (FINCH) on the server",
    "fedsa": "FedSA computes per-client margins (gaps) from each client's own prototypes",
    "fedproto": "FedProto averages the prototypes of the clients holding a class with equal weights, which needs to know which clients hold it",
    "finch": "FINCH clusters each client's prototypes on the server",
}


def supports_secure_sum(strategy_cls, params) -> tuple[bool, str]:
    """Whether the strategy's merge needs only the per-class sums and counts of a round."""
    if not getattr(strategy_cls, "merge_is_sum", False):
        return False, NOT_A_SUM.get(strategy_cls.name, f"{strategy_cls.name}'s merge is not declared to need only the sum of the uploads")
    if strategy_cls.weight_sharing(params):
        return False, f"{strategy_cls.name} with share_weights sends model weights, which are not aggregated securely here"
    return True, ""


def check_scenario(scenario, num_tasks: int, strategy_cls, params, source: str) -> None:
    """Refuse, before anything is written, a privacy setting this run cannot honour."""
    from ..objective import ClientObjective

    p = scenario.privacy
    problems: list[Problem] = []
    if p.dp:
        if strategy_cls.weight_sharing(params):
            problems.append(Problem("privacy.epsilon", f"strategy {strategy_cls.name} uploads model weights in clear; differential privacy here covers prototype uploads only (DP-SGD for weights is not implemented): use share_weights: false or another strategy"))
        elif strategy_cls.Objective.upload is not ClientObjective.upload:
            problems.append(Problem("privacy.epsilon", f"strategy {strategy_cls.name} forms its own upload (nothing or something other than prototypes); differential privacy applies to prototype uploads"))
        elif scenario.model.classifier != "ncm":
            problems.append(Problem("privacy.epsilon", f"model.classifier {scenario.model.classifier} uploads per-class second-order statistics that this mechanism does not privatise; use model.classifier: ncm"))
        elif scenario.continual.teen is not None:
            problems.append(Problem("privacy.epsilon", "continual.teen calibrates the released prototypes with the client's other prototypes, which would leave the differential-privacy guarantee; leave one of them out"))
        else:
            try:
                plan_for(scenario, num_tasks)
            except BudgetExceeded as exc:
                problems.append(Problem("privacy.noise_multiplier", str(exc)))
            except AccountantMissing as exc:
                problems.append(Problem("privacy", str(exc)))
    if p.secure_aggregation and scenario.model.classifier != "ncm":
        problems.append(Problem("privacy.secure_aggregation", f"model.classifier {scenario.model.classifier}: second-order statistics are not routed through secure aggregation yet; use model.classifier: ncm"))
    elif p.secure_aggregation:
        ok, why = supports_secure_sum(strategy_cls, params)
        sampled = max(1, int(round(scenario.clients.participation * scenario.clients.num_clients)))
        if ok and sampled < 2:
            problems.append(Problem("privacy.secure_aggregation", f"needs at least 2 clients a round (this scenario samples {sampled}): the sum of one client is that client's upload"))
        if not ok:
            problems.append(Problem("privacy.secure_aggregation", f"cannot be used with strategy {strategy_cls.name}: {why}; only merges that use the sum of the uploads (proto_avg) can"))
    if problems:
        raise UserError(source, problems)


def count_releases(releases: dict[int, int], replies: Iterable[Any]) -> None:
    """Count, per client, the training replies that released noisy statistics."""
    from ..records import METRICS

    for r in replies:
        if r.has_error() or not r.has_content() or METRICS not in r.content:
            continue
        m = r.content[METRICS]
        if RELEASED in m and int(m[RELEASED]):
            pid = int(m["partition_id"])
            releases[pid] = releases.get(pid, 0) + 1


def privacy_summary(scenario, num_tasks: int, num_clients: int, releases: dict[int, int]) -> dict[str, Any]:
    """summary.json keys under DP: the epsilon each client spent (max and mean over clients;
    a client's figure bounds every one of its samples), the noise and the budget."""
    plan = plan_for(scenario, num_tasks)
    if plan is None:
        return {}
    per_client = [epsilon_spent(plan.noise_multiplier, int(releases.get(c, 0)), plan.delta) for c in range(num_clients)]
    return {
        "epsilon_spent": {
            "max": float(np.max(per_client)),
            "mean": float(np.mean(per_client)),
            "per_client": [round(e, 6) for e in per_client],
            "releases_per_client": [int(releases.get(c, 0)) for c in range(num_clients)],
        },
        "epsilon_spent_max": float(np.max(per_client)),
        "epsilon_spent_mean": float(np.mean(per_client)),
        "privacy_delta": plan.delta,
        "privacy_noise_multiplier": plan.noise_multiplier,
        "privacy_epsilon_bound": plan.epsilon_bound,
        "privacy_epsilon_budget": scenario.privacy.epsilon,
    }
