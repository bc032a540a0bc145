"""Class-incremental inference and accuracy: no task id at test time; predictions range over
every class seen so far."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch

from .backbones import ProtoModel
from .frozen_features import FrozenFeatures
from .prototypes import PrototypeSet, nearest_prototype
from .second_order import SecondOrderStats, fit_classifier
from .training import embed

NO_PREDICTION = -1  # never a class id: counted as a wrong prediction


@torch.no_grad()
def predict(
    model: ProtoModel,
    x: np.ndarray,
    *,
    classifier: Literal["prototype", "head"],
    seen_classes: Sequence[int],
    protos: PrototypeSet | None = None,
    device: str | torch.device = "cpu",
    second_order: str = "ncm",
    stats: SecondOrderStats | None = None,
    projection: np.ndarray | None = None,
    cache: FrozenFeatures | None = None,
    features: torch.Tensor | None = None,
) -> np.ndarray:
    """Predicted class ids for ``x``: nearest prototype among the seen classes, or the argmax of
    the head restricted to the seen classes. With ``second_order`` other than ``ncm`` (``nme``,
    ``fecam``, ``mahalanobis``, ``lda``, ``ranpac`` with its random ``projection``) and ``stats`` that cover every seen class, prototype
    inference uses that classifier fitted on the merged statistics
    instead of the nearest prototype (otherwise it falls back to the nearest prototype).

    A model that knows no prototype of any seen class (e.g. a client that has not trained yet
    under ``local``) predicts :data:`NO_PREDICTION` for every sample: each sample counts as
    wrong, exactly as a sample of a class it cannot predict does. One rule for every strategy,
    so no strategy's mean is computed over fewer clients than another's.

    ``features``: ``embed(model, x, device)`` when the caller has it already (it is not computed
    again)."""
    seen = np.asarray(list(seen_classes), dtype=np.int64)
    if classifier == "prototype" and second_order != "ncm" and stats is not None and set(seen.tolist()) <= set(stats.classes.tolist()):
        feats = features if features is not None else embed(model, x, device, cache=cache)
        return fit_classifier(stats.select(seen), second_order, projection).predict(feats)
    if classifier != "head":
        usable = protos.select(seen) if protos is not None else None
        if usable is None or len(usable) == 0:
            return np.full(len(x), NO_PREDICTION, dtype=np.int64)
    feats = features if features is not None else embed(model, x, device, cache=cache)
    if classifier == "head":
        assert model.head is not None
        logits = model.head(feats)[:, torch.as_tensor(seen, device=feats.device)]
        return seen[logits.argmax(1).cpu().numpy()]
    return nearest_prototype(feats, usable)


def client_prototypes(objective: Any, continual: Any, base_classes: Sequence[int]) -> PrototypeSet | None:
    """The prototypes a client predicts with: its strategy ``objective``'s (after it received
    the global state), changed post hoc by ``continual`` (a
    :class:`~simulator.learner.continual.ContinualStack`: TEEN's calibration towards
    ``base_classes``, the first task's classes)."""
    return continual.inference_prototypes(objective.inference_prototypes(None), base_classes)


def client_predict(
    model: ProtoModel,
    x: np.ndarray,
    objective: Any,
    *,
    seen_classes: Sequence[int],
    continual: Any,
    base_classes: Sequence[int],
    device: str | torch.device = "cpu",
    second_order: str = "ncm",
    stats: SecondOrderStats | None = None,
    projection: np.ndarray | None = None,
    cache: FrozenFeatures | None = None,
    features: torch.Tensor | None = None,
    protos: PrototypeSet | None = None,
) -> np.ndarray:
    """One client's class-incremental predictions, the rule of the engine's evaluation: the
    strategy's ``objective`` says whether the head or prototypes classify, and
    :func:`client_prototypes` (unless ``protos`` gives them already) which prototypes;
    ``second_order``, ``stats``, ``projection``, ``cache`` and ``features`` as in
    :func:`predict`. Used by the ClientApp and by ``RunResult.evaluate``."""
    if protos is None:
        protos = client_prototypes(objective, continual, base_classes)
    return predict(
        model,
        x,
        classifier=objective.inference,
        seen_classes=seen_classes,
        protos=protos,
        device=device,
        second_order=second_order,
        stats=stats,
        projection=projection,
        cache=cache,
        features=features,
    )


def per_class_correct(pred: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Correct predictions and totals per class id (arrays of length ``num_classes``)."""
    y = np.asarray(y, dtype=np.int64)
    correct = np.bincount(y[pred == y], minlength=num_classes)
    total = np.bincount(y, minlength=num_classes)
    return correct.astype(np.int64), total.astype(np.int64)
