"""DP-SGD on the client for strategies that upload model weights, through Opacus.

What is private: every model update a client sends (its weights after local training) and,
as before, its prototype release (:mod:`.mechanism`). Neighbouring relation: add or remove one
training sample of one client (the same as for prototypes), so both compose into one epsilon
per client (:mod:`.accounting`).

Per local step (Abadi et al. 2016, as Opacus implements it):

* **Poisson sampling**: every sample of the client's local training set (its task data and its
  replay memory) joins the step's batch independently with probability ``q =
  privacy.sample_rate``, drawn by Opacus' ``UniformWithReplacementSampler`` (the sampler behind
  its ``DPDataLoader``) from a seeded generator; a local epoch is ``int(1 / q)`` such steps (as
  Opacus' DPDataLoader), whatever the number of samples, so the number of steps a client takes
  does not depend on its data. Batches may be empty or hold one sample: every step is taken
  (an empty batch releases pure noise), none is skipped.
* **Per-sample gradients** by Opacus' ``GradSampleModule`` (hooks on the model's layers; the
  loss must be a mean of per-sample terms: the head's cross-entropy, LwF's distillation of
  the head's logits and the feature distillation are; the prototypical loss, PRD's SupCon and
  EWC's penalty on the parameters are not, and are refused before the run);
* **clipping and noise** by Opacus' ``DPOptimizer`` around the loop's SGD optimizer: each
  per-sample gradient is clipped to L2 norm ``C = privacy.grad_clip``, the clipped gradients are
  summed, ``N(0, (sigma C)^2 I)`` is added, and the sum is divided by a PUBLIC constant,
  ``training.batch_size`` (``SgdPlan.divisor``). Opacus' own normalisation divides by the
  expected batch size ``q n``, with ``n`` the client's exact sample count: the update's scale
  would then carry ``n``, which the add/remove-one relation does not allow to be released
  exactly. Momentum and weight decay act on the noisy gradient (post-processing).

Where ours differs from a plain ``PrivacyEngine.make_private``: we keep the one training loop
(with its hooks) and index tensors with the sampler's indices instead of going through a
DataLoader; the accountant is dp-accounting's (composed with the prototype releases), not the
PrivacyEngine's.

Simulator note: ``secure_mode`` is OFF. The sampling and the noise come from ``torch.Generator``s
seeded from the run seed, the client, the task and the round (reproducible runs; a resumed run
gives the identical matrix). A deployment must use ``secure_mode=True`` (a cryptographically
secure generator and the floating-point attack mitigation); the guarantee assumes the server
cannot predict the noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..seeding import derive_seed


@dataclass(frozen=True)
class SgdPlan:
    """DP-SGD's settings for a run, fixed before it starts."""

    noise_multiplier: float  # sigma: noise std / clip
    clip: float  # C: per-sample gradient L2 norm
    sample_rate: float  # q: Poisson sampling probability of every sample at every step
    epochs: int  # local epochs per round
    # what the noisy sum of clipped gradients is divided by; None: Opacus' expected batch size
    # q n, which depends on the client's sample count n (a leak of the exact n under
    # add/remove-one); runs set a public constant (training.batch_size)
    divisor: float | None = None

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.sample_rate)

    @property
    def steps_per_round(self) -> int:
        return self.epochs * self.steps_per_epoch


def steps_per_epoch(sample_rate: float) -> int:
    """Opacus' DPDataLoader convention: ``int(1 / q)`` Poisson-sampled steps make an epoch."""
    return max(1, int(1.0 / float(sample_rate)))


class PrivateTraining:
    """What the one training loop asks of DP-SGD (see ``train_local(private=...)``): the
    Poisson-sampled batches, the model with per-sample gradient hooks, the private optimizer,
    and the step on an empty batch. Built once per local training call."""

    def __init__(self, plan: SgdPlan, seed: int) -> None:
        self.plan = plan
        self._sampling = torch.Generator().manual_seed(derive_seed(seed, "dp_sgd_sampling"))
        self._noise_seed = derive_seed(seed, "dp_sgd_noise")
        self._gsm = None
        self._opt = None

    # ---- batches
    def batches(self, n: int, epochs: int) -> Iterator[torch.Tensor]:
        """Indices of each step's batch: ``epochs x int(1/q)`` Poisson samples of ``range(n)``."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.plan.sample_rate, generator=self._sampling, steps=self.plan.steps_per_epoch
        )
        for _ in range(epochs):
            for idx in sampler:
                yield torch.as_tensor(idx, dtype=torch.int64)

    # ---- model and optimizer
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> torch.optim.Optimizer:
        """Hook ``model`` for per-sample gradients and wrap ``optimizer`` in Opacus' DPOptimizer."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        device = next(model.parameters()).device
        # the noise is drawn on the parameters' device (Opacus draws it there with this generator)
        noise = torch.Generator(device=device).manual_seed(self._noise_seed)
        self._gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
        self._opt = DPOptimizer(
            optimizer,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.clip,
            expected_batch_size=self.plan.divisor if self.plan.divisor is not None else self.plan.sample_rate * n,
            loss_reduction="mean",
            generator=noise,
            secure_mode=False,  # simulator: seeded, reproducible noise (see the module note)
        )
        return self._opt

    def backward(self, loss: torch.Tensor) -> None:
        with warnings.catch_warnings():
            # the first layer's inputs never need gradients: torch says its full backward hook
            # fires for the outputs only, which is what Opacus uses
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()

    def empty_step(self) -> None:
        """A step on an empty batch: no per-sample gradient, so the update is the noise alone
        (what Opacus does for an empty Poisson batch)."""
        assert self._opt is not None
        # clear what the previous step left (its processed summed_grad): the loop clears before
        # each backward, and an empty batch has none; without this Opacus refuses a non-empty,
        # empty, non-empty sequence of batches (a client with few samples)
        self._opt.zero_grad(set_to_none=True)
        for p in self._opt.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)

    def detach(self) -> None:
        """Remove the hooks and Opacus' attributes: the model is a plain module again."""
        if self._gsm is not None:
            self._gsm.remove_hooks()
            self._gsm._close()
            self._gsm = None
        if self._opt is not None:
            for p in self._opt.params:
                for attr in ("grad_sample", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        self._opt = None
