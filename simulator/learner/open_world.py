"""Open-world scores: how strongly a model claims a test sample belongs to the classes it has
learned so far. Higher means "more known". The evaluation ranks the samples of learned classes
(positives) above those of classes still to come (negatives); the ranking metrics themselves
(AUROC, FPR at 95% TPR) live in :mod:`simulator.metrics`.

Two scores, one per kind of inference (``Objective.inference``):

- ``prototype``: the cosine similarity between the sample's embedding and the closest (by
  cosine) prototype of a seen class, among the prototypes the client predicts with;
- ``head``: the maximum softmax probability over the seen classes' logits (MSP, Hendrycks &
  Gimpel 2017).

Second-order classifiers (``model.classifier`` other than ``ncm``: Mahalanobis, LDA, FeCAM,
RanPAC) predict with statistics fitted on the merged features, but their open-world score stays
the prototype cosine score: one score for every prototype method, whichever decision rule
follows the embedding.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from .backbones import ProtoModel
from .prototypes import PrototypeSet


def usable_prototypes(protos: PrototypeSet | None, seen_classes: Sequence[int]) -> PrototypeSet | None:
    """The prototypes of the seen classes, or None when there is none (no score then)."""
    if protos is None:
        return None
    usable = protos.select(np.asarray(list(seen_classes), dtype=np.int64))
    return usable if len(usable) else None


@torch.no_grad()
def prototype_scores(features: torch.Tensor | np.ndarray, protos: PrototypeSet) -> np.ndarray:
    """``max_c cos(f, p_c)`` for each row ``f`` of ``features`` over the rows ``p_c`` of
    ``protos`` (a zero vector has cosine 0 with everything). Float64, one value per row."""
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    f = f.detach().to(torch.float64).cpu()
    p = torch.as_tensor(protos.vectors, dtype=torch.float64)
    if len(p) == 0:
        raise ValueError("no prototypes to score with")
    f_unit = torch.nn.functional.normalize(f, dim=1)
    p_unit = torch.nn.functional.normalize(p, dim=1)
    return (f_unit @ p_unit.T).max(dim=1).values.numpy()


@torch.no_grad()
def msp_scores(logits: torch.Tensor | np.ndarray, seen_classes: Sequence[int]) -> np.ndarray:
    """Maximum softmax probability over the columns ``seen_classes`` of ``logits`` (the other
    classes take no part in the softmax). Float64, one value per row."""
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    cols = torch.as_tensor(np.asarray(list(seen_classes), dtype=np.int64), device=z.device)
    z = z.detach()[:, cols].to(torch.float64)
    return torch.softmax(z, dim=1).max(dim=1).values.cpu().numpy()


@torch.no_grad()
def open_world_scores(
    model: ProtoModel,
    features: torch.Tensor,
    *,
    inference: Literal["prototype", "head"],
    seen_classes: Sequence[int],
    protos: PrototypeSet | None,
) -> np.ndarray | None:
    """The score of each embedded sample for a model that infers with ``inference``; None when
    it cannot score (prototype inference without a prototype of any seen class)."""
    if inference == "head":
        if model.head is None:
            raise ValueError("head inference without a head")
        return msp_scores(model.head(features), seen_classes)
    usable = usable_prototypes(protos, seen_classes)
    return None if usable is None else prototype_scores(features, usable)
