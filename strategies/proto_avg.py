"""``proto_avg``: prototype averaging as in Federated Reconnaissance (Hendryx et al., 2021).

Clients upload each class's mean embedding and its sample count. Within a round the server's
prototype of a class is the exact count-weighted mean of the uploads, which equals the mean of
all the clients' samples pooled. Across rounds, ``merge`` decides what happens to a class that
is uploaded again:

* ``replace`` (default): the round's merged prototype replaces the old one (the backbones moved
  since, so older means live in an older feature space);
* ``running_mean``: Federated Reconnaissance's running mean over every upload ever received,
  ``N_c += n; p_c += n / N_c (q - p_c)``, i.e. the count-weighted mean of all of them. Exact
  when the backbones do not move (frozen, or shared and converged); otherwise it mixes feature
  spaces of different rounds, and a class re-uploaded from a 20-exemplar replay memory moves its
  prototype by 20 / N_c only instead of replacing a mean over thousands of samples.

A class that nobody uploads keeps its prototype: knowledge of earlier tasks stays on the server.
docs/strategies.md gives the measured comparison of the two rules on the standard benchmark.

Differs from the paper: the paper meta-trains one backbone centrally and then only moves
prototypes; here clients keep training their backbones (``continual.backbone`` can freeze them),
and ``share_weights: true`` also FedAvg-averages the backbones each round so that every client
embeds into one feature space. Without it, prototypes from independently trained backbones are
averaged across different feature spaces, which the simulator shows rather than hides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from simulator.learner.prototypes import merge_class_means

from .base import FederatedStrategy, ShareWeights, StrategyParams, Upload


class Params(StrategyParams):
    share_weights: ShareWeights = Field(False, description="also FedAvg the backbone weights each round (one shared feature space); first_task: only during the first task, then the backbone is frozen and only prototypes travel")
    merge: Literal["replace", "running_mean"] = Field(
        "replace",
        description="a class uploaded again: the round's mean replaces the old prototype, or the count-weighted running mean over every upload ever received (Federated Reconnaissance)",
    )


class ProtoAvg(FederatedStrategy):
    name = "proto_avg"
    description = "count-weighted prototype averaging (Federated Reconnaissance); share_weights adds FedAvg of the backbone"
    Params = Params
    merge_is_sum = True  # the round's merge needs only per-class sums and counts (privacy.secure_aggregation)

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        merged = merge_class_means([u.protos for u in uploads if u.protos is not None], "samples")
        if getattr(self.params, "merge", "replace") == "running_mean" and len(self.global_protos):  # plugin subclasses may keep their own Params
            # both sets carry their sample counts: merging them count-weighted is the running mean
            merged = merge_class_means([self.global_protos.select(merged.classes), merged], "samples")
        self.global_protos = self.global_protos.updated_with(merged)
        if self.shares_weights:
            self.merge_weights(uploads)
