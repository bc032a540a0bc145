"""Privacy at the run level: checks before a run starts, release counting during it, the
epsilon spent in its summary."""

from __future__ import annotations

import importlib.util
from typing import Any, Iterable

import numpy as np

from ..errors import Problem, UserError
from .accounting import AccountantMissing, BudgetExceeded
from .client import RELEASED, SGD_STEPS, plan_for

#: why a strategy's merge cannot run on a securely aggregated sum
NOT_A_SUM = {
    "fedtgp": "FedTGP trains its global prototypes on the server from each client's own prototypes",
    "fpl": "FPL clusters each client's prototypes (FINCH) on the server",
    "fedsa": "FedSA computes per-client margins (gaps) from each client's own prototypes",
    "fedproto": "FedProto averages the prototypes of the clients holding a class with equal weights, which needs to know which clients hold it",
    "palm": "PALM merges each client's mixture components weighted by their masses, which needs each client's own components",
    "finch": "FINCH clusters each client's prototypes on the server",
}


def supports_secure_sum(strategy_cls, params) -> tuple[bool, str]:
    """Whether the strategy's merge needs only the per-class sums and counts of a round."""
    if not getattr(strategy_cls, "merge_is_sum", False):
        return False, NOT_A_SUM.get(strategy_cls.name, f"{strategy_cls.name}'s merge is not declared to need only the sum of the uploads")
    if strategy_cls.weight_sharing(params):
        return False, f"{strategy_cls.name} with share_weights sends model weights, which are not aggregated securely here"
    return True, ""


def dp_sgd_problems(scenario, strategy_cls, params) -> list[Problem]:
    """Why DP-SGD (Opacus) cannot protect this weight-sharing run, if it cannot: it needs a loss
    that is a mean of per-sample terms and layers without batch statistics."""
    from ..learner.backbones import BACKBONES
    from ..objective import ClientObjective

    if importlib.util.find_spec("opacus") is None:
        return [Problem("privacy", "DP-SGD of strategies that upload weights needs Opacus: pip install 'protofed[privacy]'")]
    out: list[Problem] = []
    objective = strategy_cls.Objective
    if objective.train_loss != "head":
        key = "strategy.params.share_weights" if "share_weights" in type(params).model_fields else "strategy.name"
        loss = ("its own loss (PALM: a Sinkhorn assignment over the whole batch and prototypes moved by the batch's mean)"
                if objective.train_loss == "none" else "the prototypical loss")
        out.append(Problem(key, (
            f"strategy {strategy_cls.name} uploads model weights trained with {loss}, which couples "
            "each sample with the other samples of its batch: one sample moves every other sample's "
            "loss, so clipping per-sample gradients (DP-SGD) does not bound its influence. DP-SGD is available for "
            "strategies trained with a per-sample loss (fedavg, finetune); use share_weights: false to protect "
            "only the prototype uploads")))
        return out
    if objective.extra_loss is not ClientObjective.extra_loss:
        # a strategy's own loss term may couple the samples of a batch; we cannot tell which do
        out.append(Problem("strategy.name", (
            f"strategy {strategy_cls.name} adds its own loss term, which DP-SGD can protect only if it is a mean of "
            "per-sample terms; not verified for this strategy, so it is refused under DP")))
    norms = {scenario.model.backbone_of(c) for c in range(scenario.clients.num_clients)}
    if scenario.model.norm in ("batch", "batch_local") and any(BACKBONES[b].norms for b in norms if b in BACKBONES):
        out.append(Problem("model.norm", (
            f"model.norm {scenario.model.norm}: BatchNorm normalises each sample with its batch's statistics, so "
            "per-sample gradients (DP-SGD, Opacus) do not exist; use model.norm: group (or none)")))
    if objective.uses_continual:
        c = scenario.continual
        if c.ewc is not None:
            out.append(Problem("continual.ewc", (
                "EWC's penalty acts on the parameters, not through per-sample gradients (DP-SGD would drop it), and "
                "its Fisher information is computed from the client's data without noise; leave it out under DP")))
        if c.prd is not None:
            out.append(Problem("continual.prd", (
                "PRD's supervised contrastive term compares each sample with the others of its batch, so per-sample "
                "clipping (DP-SGD) does not bound one sample's influence; leave it out under DP (lwf works)")))
        if c.ope is not None:
            out.append(Problem("continual.ope", (
                "OPE contrasts the prototypes of the batch's classes, each the mean of several samples, so per-sample "
                "clipping (DP-SGD) does not bound one sample's influence; leave it out under DP")))
    return out


def release_problems(scenario, strategy_cls, params) -> list[Problem]:
    """Why the accountant's sensitivity would be false for this run's releases, if it would be.

    The accountant assumes that adding or removing one sample of a client moves one of its
    released class sums by at most ``clip`` and one count by 1 (prototype releases), or one
    DP-SGD step's clipped gradient sum by at most ``grad_clip``. Both fail when (a) the
    embedding function was trained on the client's data without DP: removing a sample changes
    the backbone and so every other sample's embedding (measured by
    ``tests/test_privacy_end_to_end.py``: a class-sum difference of hundreds where ``clip`` is
    10); (b) a replay memory is kept: which samples it keeps (and releases again in later tasks)
    is drawn among the task's samples, so one sample changes which others are kept."""
    from strategies.base import FederatedStrategy

    out: list[Problem] = []
    c = scenario.continual
    if getattr(strategy_cls, "aggregate_evaluate", None) is not FederatedStrategy.aggregate_evaluate:
        out.append(Problem("strategy.name", (
            f"strategy {strategy_cls.name} reads the clients' evaluation replies (per-class accuracies of models "
            "trained on their data, and their class counts); under DP those are the simulator's measurement and "
            "must never reach the strategy")))
    if c.memory_per_class > 0 and strategy_cls.Objective.uses_continual:
        out.append(Problem("continual.memory_per_class", (
            f"continual.memory_per_class {c.memory_per_class}: the replay memory is drawn among the task's samples, so "
            "adding or removing one sample changes which other samples are kept and released again in later tasks; "
            "the per-sample bound the accountant assumes does not hold. Use continual.memory_per_class: 0 under DP")))
    trains_backbone = c.backbone != "frozen"
    if strategy_cls.Objective.uploads_prototypes and not strategy_cls.weight_sharing(params) and trains_backbone:
        out.append(Problem("continual.backbone", (
            f"continual.backbone {c.backbone}: strategy {strategy_cls.name} releases class sums of embeddings computed "
            "by a backbone the client trained, without DP, on those same samples; removing one sample changes the "
            "backbone and every other sample's embedding, so a class sum moves by far more than privacy.clip and the "
            "epsilon would not be a guarantee. Use continual.backbone: frozen (a backbone that never trains on client "
            "data: its seeded initialisation, or model.pretrained trained on public data only)")))
    return out


def check_scenario(scenario, num_tasks: int, strategy_cls, params, source: str) -> None:
    """Refuse, before anything is written, a privacy setting this run cannot honour."""
    from ..objective import ClientObjective

    p = scenario.privacy
    problems: list[Problem] = []
    if p.dp:
        sgd_problems = dp_sgd_problems(scenario, strategy_cls, params) if strategy_cls.weight_sharing(params) else []
        if sgd_problems:
            problems += sgd_problems
        elif strategy_cls.Objective.upload is not ClientObjective.upload:
            problems.append(Problem("privacy.epsilon", f"strategy {strategy_cls.name} forms its own upload (nothing or something other than prototypes); differential privacy applies to prototype uploads"))
        elif scenario.model.classifier != "ncm":
            problems.append(Problem("privacy.epsilon", f"model.classifier {scenario.model.classifier} uploads per-class second-order statistics that this mechanism does not privatise; use model.classifier: ncm"))
        elif release := release_problems(scenario, strategy_cls, params):
            problems += release
        else:
            try:
                plan_for(scenario, num_tasks)
            except BudgetExceeded as exc:
                key = "privacy.sgd_noise_multiplier" if "alone spend" in str(exc) else "privacy.noise_multiplier"
                problems.append(Problem(key, str(exc)))
            except AccountantMissing as exc:
                problems.append(Problem("privacy", str(exc)))
    cohort = scenario.resources.clients_per_call
    if p.secure_aggregation and cohort != "auto" and int(cohort) > 1:
        # measured: Flower's SecAgg+ client mod fails when members of one cohort share a call
        # (missing stage keys, missing key shares), so secure runs keep one client per call
        problems.append(Problem("resources.clients_per_call", f"secure aggregation runs one client per engine call; set resources.clients_per_call to 1 or auto (it is {cohort})"))
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


def count_releases(releases: dict[int, int], replies: Iterable[Any], sgd_steps: dict[int, int] | None = None) -> None:
    """Count, per client, the training replies that released noisy statistics (and the
    DP-SGD steps they took, into ``sgd_steps``)."""
    from ..records import METRICS

    for r in replies:
        if r.has_error() or not r.has_content() or METRICS not in r.content:
            continue
        m = r.content[METRICS]
        pid = int(m["partition_id"])
        if RELEASED in m and int(m[RELEASED]):
            releases[pid] = releases.get(pid, 0) + 1
        if sgd_steps is not None and SGD_STEPS in m:
            sgd_steps[pid] = sgd_steps.get(pid, 0) + int(m[SGD_STEPS])


def privacy_summary(scenario, num_tasks: int, num_clients: int, releases: dict[int, int],
                    sgd_steps: dict[int, int] | None = None) -> dict[str, Any]:
    """summary.json keys under DP: the epsilon each client spent (max and mean over clients;
    a client's figure bounds every one of its samples; under DP-SGD its steps and its prototype
    releases composed), the noise and the budget."""
    plan = plan_for(scenario, num_tasks)
    if plan is None:
        return {}
    sgd_steps = sgd_steps or {}
    per_client = [plan.epsilon(int(releases.get(c, 0)), int(sgd_steps.get(c, 0))) for c in range(num_clients)]
    extra: dict[str, Any] = {}
    if plan.sgd is not None:
        extra = {
            "privacy_dp_sgd": {
                "noise_multiplier": plan.sgd.noise_multiplier,
                "grad_clip": plan.sgd.clip,
                "sample_rate": plan.sgd.sample_rate,
                "steps_per_round": plan.sgd.steps_per_round,
                "max_steps_per_client": plan.max_sgd_steps,
                "steps_per_client": [int(sgd_steps.get(c, 0)) for c in range(num_clients)],
                "secure_mode": False,
            },
        }
    return extra | {
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
