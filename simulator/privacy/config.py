"""The ``privacy:`` section of a scenario (all off by default).

Differential privacy is on when ``epsilon`` or ``noise_multiplier`` is set; secure aggregation
is independent of it (``secure_aggregation: true``). See :mod:`simulator.privacy.mechanism`
for what is released and :mod:`simulator.privacy.accounting` for how the loss is tracked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mechanism: Literal["gaussian"] = Field(
        "gaussian",
        description="noise added to each client's per-class sums of clipped embeddings and counts (used when epsilon or noise_multiplier is set)",
    )
    epsilon: float | None = Field(
        None, ge=0.01, le=1000.0,
        description="privacy budget per client over the whole run (add/remove one sample); alone: the noise is calibrated to it; with noise_multiplier: a run that would exceed it is refused",
    )
    noise_multiplier: float | None = Field(
        None, ge=0.01, le=1e6,
        description="noise std / sensitivity of one release (instead of, or checked against, epsilon)",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="delta of the (epsilon, delta) guarantee")
    clip: float = Field(1.0, gt=0.0, le=1e6, description="L2 norm each sample's embedding is clipped to before summing")
    count_share: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="share of each release's privacy given to the class counts (the rest to the sums): s_n = z / sqrt(share), s_s = clip z / sqrt(1 - share)",
    )
    # DP-SGD of the strategies that upload model weights (simulator/privacy/dp_sgd.py)
    grad_clip: float = Field(
        1.0, gt=0.0, le=1e6,
        description="DP-SGD (weight-sharing strategies): L2 norm each per-sample gradient is clipped to (C)",
    )
    sample_rate: float = Field(
        0.1, gt=0.0, le=1.0,
        description="DP-SGD: probability that each local sample joins a step's batch (Poisson sampling); a local epoch is int(1 / sample_rate) steps",
    )
    sgd_noise_multiplier: float | None = Field(
        None, ge=0.01, le=1e6,
        description="DP-SGD: noise std / grad_clip of every step; unset: the same multiplier as the prototype releases (calibrated together to epsilon)",
    )
    secure_aggregation: bool = Field(
        False, description="clients upload masked per-class sums and counts (SecAgg+ protocol); the server learns only their sum"
    )
    secure_range: float = Field(
        1e5, gt=0.0, le=1e12,
        description="public bound on every per-class sum coordinate and count under secure aggregation (fixes the integer quantisation: about 2e-9 x range per coordinate)",
    )
    keep_uploads: bool = Field(
        False, description="record what the server received (uploads.npz in the run dir) for `protofed attack`"
    )

    @model_validator(mode="after")
    def _sgd_noise_needs_dp(self) -> "PrivacyConfig":
        if self.sgd_noise_multiplier is not None and not self.dp:
            raise ValueError("sgd_noise_multiplier is set but differential privacy is off: set epsilon or noise_multiplier too")
        return self

    @property
    def dp(self) -> bool:
        """Whether differential privacy is on."""
        return self.epsilon is not None or self.noise_multiplier is not None
