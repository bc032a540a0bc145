"""``proto_avg``: prototype averaging as in Federated Reconnaissance (Hendryx et al., 2021).

Clients upload each class's mean embedding and its sample count. Within a round the server's
prototype of a class is the exact count-weighted mean of the uploads, which equals the mean of
all the clients' samples pooled (the order-independent running mean of the paper). Across rounds
a class that is uploaded again replaces its old prototype (the backbones moved since), and a
class that nobody uploads keeps its prototype: knowledge of earlier tasks stays on the server.

Differs from the paper: the paper meta-trains one backbone centrally and then only moves
prototypes; here clients keep training their backbones (``continual.backbone`` can freeze them),
and ``share_weights: true`` also FedAvg-averages the backbones each round so that every client
embeds into one feature space. Without it, prototypes from independently trained backbones are
averaged across different feature spaces, which the simulator shows rather than hides.
"""

from __future__ import annotations

from pydantic import Field

from simulator.learner.prototypes import merge_class_means

from .base import FederatedStrategy, ShareWeights, StrategyParams, Upload


class Params(StrategyParams):
    share_weights: ShareWeights = Field(False, description="also FedAvg the backbone weights each round (one shared feature space); first_task: only during the first task, then the backbone is frozen and only prototypes travel")


class ProtoAvg(FederatedStrategy):
    name = "proto_avg"
    description = "count-weighted prototype averaging (Federated Reconnaissance); share_weights adds FedAvg of the backbone"
    Params = Params

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        merged = merge_class_means([u.protos for u in uploads if u.protos is not None], "samples")
        self.global_protos = self.global_protos.updated_with(merged)
        if self.shares_weights:
            self.merge_weights(uploads)
