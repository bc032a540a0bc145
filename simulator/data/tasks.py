"""Class order and the cut of that order into class-incremental tasks."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable

from .. import seeding
from ..errors import FieldError

if TYPE_CHECKING:  # pragma: no cover
    from ..scenario import TasksConfig


def _listed(values: Iterable[int], limit: int = 10) -> str:
    vals = list(values)
    shown = ", ".join(str(v) for v in vals[:limit])
    extra = f", ... ({len(vals) - limit} more)" if len(vals) > limit else ""
    return f"[{shown}{extra}]"


def make_class_order(tasks: "TasksConfig", num_classes: int, seed: int) -> list[int]:
    """The order in which classes arrive: ``sorted``, ``seeded`` (a permutation drawn from the
    scenario seed) or an explicit list that must be a permutation of ``0..num_classes-1``."""
    order = tasks.class_order
    if order == "sorted":
        return list(range(num_classes))
    if order == "seeded":
        return [int(c) for c in seeding.rng(seed, "class_order").permutation(num_classes)]
    order = [int(c) for c in order]
    counts = Counter(order)
    out_of_range = sorted({c for c in order if not 0 <= c < num_classes})
    repeated = sorted(c for c, k in counts.items() if k > 1 and 0 <= c < num_classes)
    missing = [c for c in range(num_classes) if c not in counts]
    if out_of_range or repeated or missing:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if repeated:
            parts.append(f"repeated {_listed(repeated)}")
        if out_of_range:
            parts.append(f"out of range {_listed(out_of_range)} (class ids run from 0 to {num_classes - 1})")
        raise FieldError(
            "tasks.class_order",
            f"an explicit class order must list each of the {num_classes} classes exactly once; " + "; ".join(parts),
        )
    return order


def split_into_tasks(order: list[int], tasks: "TasksConfig") -> list[list[int]]:
    """Cut the class order into tasks.

    ``initial_classes`` (optional) forms task 0. The remaining classes are cut into groups of
    ``classes_per_task`` (the last group may be smaller), or into ``num_tasks`` tasks in total
    (counting the initial one) as evenly as possible, earlier tasks taking the extra classes.
    """
    c = len(order)
    init = tasks.initial_classes
    cpt = tasks.classes_per_task
    n = tasks.num_tasks
    if cpt is None and n is None:  # the schema fills in a default; be safe for hand-built configs
        cpt = 2
    if init is not None and init > c:
        raise FieldError("tasks.initial_classes", f"{init} initial classes requested but the dataset has only {c} classes")
    head: list[list[int]] = [list(order[:init])] if init is not None else []
    rest = list(order[init:]) if init is not None else list(order)

    if cpt is not None:
        if cpt > c:
            raise FieldError(
                "tasks.classes_per_task", f"{cpt} classes per task requested but the dataset has only {c} classes"
            )
        return head + [rest[i : i + cpt] for i in range(0, len(rest), cpt)]

    assert n is not None
    if init is None:
        if n > c:
            raise FieldError(
                "tasks.num_tasks", f"{n} tasks requested but the dataset has only {c} classes (each task needs at least one)"
            )
        groups = n
    else:
        groups = n - 1
        if not rest and groups > 0:
            raise FieldError(
                "tasks.num_tasks",
                f"tasks.initial_classes takes all {c} classes, so num_tasks must be 1 (got {n})",
            )
        if rest and groups == 0:
            raise FieldError(
                "tasks.num_tasks",
                f"num_tasks 1 leaves no task for the {len(rest)} classes after the {init} initial ones; "
                "raise num_tasks or set tasks.initial_classes to all classes",
            )
        if groups > len(rest):
            raise FieldError(
                "tasks.num_tasks",
                f"{n} tasks need at least {groups} classes after the {init} initial ones, but only {len(rest)} remain",
            )
    if groups == 0:
        return head
    base, extra = divmod(len(rest), groups)
    out: list[list[int]] = []
    start = 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(rest[start : start + size])
        start += size
    return head + out
