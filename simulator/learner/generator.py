"""Data-free synthesis for TARGET (Zhang et al., ICCV 2023): a small conditional generator per
input kind and the server-side loop that trains it against a frozen classifier (the teacher).

Pure PyTorch; knows nothing of Flower or Ray. The strategy (``strategies/target.py``) calls
:func:`synthesize` with the global model at a task boundary and sends the generator to clients,
which draw synthetic samples of the old classes with :meth:`Generator.sample`.

The generator loss (per step, a batch of ``z ~ N(0, I)`` and labels ``y`` drawn uniformly over
the classes the teacher knows)::

    oh * CE(T(G(z, y)), y)                                   # the teacher must see class y
  + bn * sum_BN (||mu(x_l) - mu_run||_2 + ||var(x_l) - var_run||_2)   # DeepInversion statistics
  + adv * ( - mean_i [argmax S = argmax T]_i KL(T(x_i) || S(x_i)) )    # adversarial to the student

where ``x_l`` is the input of each BatchNorm layer of the teacher (read by forward hooks; the
teacher is in eval mode, so its running statistics are the FedAvg-averaged ones it received) and
the student is a freshly initialised copy of the architecture trained, between generator steps,
to imitate the teacher on synthetic samples (KL at temperature ``student_temperature``).

Where ours differs from the official code (``zj-jayzhang/Federated-Class-Continual-Learning``,
``methods/target.py``), and why:

* **Conditional generator, fresh noise.** The official generator is unconditional; each of its
  ``syn_round`` calls optimises a new batch of ``z`` together with a clone of the generator
  (first-order MAML) for ``g_steps`` steps and keeps the best batch in an image pool on disk,
  which the clients read. We send the generator itself (far smaller than a pool of images, and
  the client can draw as many samples as it trains batches), so samples must come from fresh
  ``z``: the label is an input (an embedding concatenated with ``z``) so that
  ``CE(T(G(z, y)), y)`` is reachable for every ``z`` and the client can balance the old classes.
  No MAML / per-batch ``z`` optimisation.
* **The adversarial term runs.** The official CIFAR-100 schedule (``syn_round`` 10 < ``warmup``
  20) never reaches it; ours runs it after ``warmup`` of ``rounds`` rounds.
* No augmentation (random crop / flip) of the synthetic samples before the teacher and no
  output squashing (the official ``Sigmoid`` + normalisation assumes images in [0, 1]); our inputs
  have no fixed range. No momentum over batches of the BatchNorm statistics (``bn_mmt``).
* Adam for the student (the official code uses SGD, lr 0.2, cosine schedule, over 400 steps per
  round), with few steps per round: sized for a 2-core CPU.
* A teacher without BatchNorm layers (``model.norm: group | none``) gives no statistics term;
  under ``batch_local`` (FedBN) the global model holds no averaged statistics, so the term matches
  the initial running statistics and should be switched off (``bn: 0``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Kind = Literal["signal", "image"]


def kind_of(input_shape: Sequence[int], kind: str = "auto") -> Kind:
    """``signal`` for ``(L,)`` and ``(C, L)`` samples, ``image`` for ``(C, H, W)``; a 2-D shape is a
    signal unless ``kind`` says image (then it is ``(H, W)``)."""
    if kind in ("signal", "image"):
        if kind == "image" and len(input_shape) not in (2, 3):
            raise ValueError(f"an image generator needs (C, H, W) or (H, W) samples, got {tuple(input_shape)}")
        if kind == "signal" and len(input_shape) not in (1, 2):
            raise ValueError(f"a signal generator needs (L,) or (C, L) samples, got {tuple(input_shape)}")
        return kind  # type: ignore[return-value]
    if len(input_shape) in (1, 2):
        return "signal"
    if len(input_shape) == 3:
        return "image"
    raise ValueError(f"no generator for samples of shape {tuple(input_shape)}")


class Generator(nn.Module):
    """``(z, y) -> sample``: ``[z, embed(y)]`` -> linear -> a quarter-size map with ``2 ngf``
    channels -> (BatchNorm, upsample x2, 3-tap conv, BatchNorm, LeakyReLU) twice -> conv to the
    sample's channels, cropped to the sample's size (the official generator's shape, in 1-D for
    signals). BatchNorm layers use batch statistics only (no running buffers), in training and
    sampling alike, so the state sent to clients is parameters only."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, nz: int = 32, ngf: int = 16, kind: str = "auto") -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.kind: Kind = kind_of(self.input_shape, kind)
        self.nz, self.ngf, self.num_classes = int(nz), int(ngf), int(num_classes)
        shape = self.input_shape
        if self.kind == "signal":
            self.channels, self.size = (1, (shape[0],)) if len(shape) == 1 else (shape[0], (shape[1],))
            conv, bnorm = nn.Conv1d, nn.BatchNorm1d
        else:
            self.channels, self.size = (1, tuple(shape)) if len(shape) == 2 else (shape[0], tuple(shape[1:]))
            conv, bnorm = nn.Conv2d, nn.BatchNorm2d
        self.init_size = tuple(max(1, math.ceil(s / 4)) for s in self.size)
        c2 = 2 * self.ngf
        self.embed = nn.Embedding(self.num_classes, self.nz)
        self.l1 = nn.Linear(2 * self.nz, c2 * math.prod(self.init_size))
        mode = "nearest"
        self.blocks = nn.Sequential(
            bnorm(c2, track_running_stats=False),
            nn.Upsample(scale_factor=2, mode=mode),
            conv(c2, c2, 3, padding=1, bias=False),
            bnorm(c2, track_running_stats=False),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode=mode),
            conv(c2, self.ngf, 3, padding=1, bias=False),
            bnorm(self.ngf, track_running_stats=False),
            nn.LeakyReLU(0.2),
            conv(self.ngf, self.channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.l1(torch.cat([z, self.embed(y)], dim=1))
        h = self.blocks(h.view(h.shape[0], 2 * self.ngf, *self.init_size))
        h = h[(..., *(slice(0, s) for s in self.size))]  # crop the upsampled map to the sample size
        return h.reshape(h.shape[0], *self.input_shape)

    def sample(self, n: int, classes: Sequence[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples (no gradient) with labels drawn uniformly from ``classes``, from ``gen``."""
        device = self.l1.weight.device
        cls = torch.as_tensor(list(classes), dtype=torch.int64)
        y = cls[torch.randint(len(cls), (n,), generator=gen)]
        z = torch.randn(n, self.nz, generator=gen)
        with torch.no_grad():
            return self(z.to(device), y.to(device)), y.to(device)


# --------------------------------------------------------------------------- synthesis
class BNStatsHook:
    """Forward hook on one BatchNorm layer: the distance between the batch statistics of its
    input and the layer's running statistics (DeepInversion, Yin et al. CVPR 2020)."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        self.module = module
        self.loss: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0]
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        self.loss = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def remove(self) -> None:
        self.handle.remove()


def bn_hooks(model: nn.Module) -> list[BNStatsHook]:
    return [
        BNStatsHook(m) for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def logits_of(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The head's logits of a ``ProtoModel`` restricted to ``classes`` (column i = classes[i])."""
    return model.head(model(x))[:, classes]  # type: ignore[operator]


def kl_per_sample(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` per sample."""
    t = float(temperature)
    p = torch.softmax(teacher_logits / t, dim=1)
    return (p * (torch.log_softmax(teacher_logits / t, dim=1) - torch.log_softmax(student_logits / t, dim=1))).sum(1)


@dataclass
class SynthesisConfig:
    """Defaults: loss weights of the paper / official CIFAR-100 code (``oh`` 0.5, ``bn`` 10,
    ``adv`` 1, ``lr_g`` 0.002 as its inner generator lr); rounds, steps and batch sizes are ours,
    sized for a 2-core CPU (official: 10 rounds x 10 generator steps on 256 samples, 400 student
    steps per round)."""

    rounds: int = 20
    warmup: int = 5  # rounds before the student is trained and the adversarial term is used
    generator_steps: int = 10  # per round
    student_steps: int = 30  # per round, from ``warmup`` on
    batch_size: int = 128
    oh: float = 0.5
    bn: float = 10.0
    adv: float = 1.0
    lr_g: float = 0.002
    lr_student: float = 0.001
    student_temperature: float = 20.0


@dataclass
class SynthesisReport:
    """What one synthesis did, measured on a fixed batch of fresh samples before and after."""

    seconds: float
    classes: int
    ce_before: float
    ce_after: float
    bn_before: float
    bn_after: float
    teacher_acc_before: float  # fraction of synthetic samples the teacher assigns their sampled label
    teacher_acc_after: float
    student_agreement: float  # fraction on which the student's argmax equals the teacher's (after)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def _probe(generator: Generator, teacher: nn.Module, hooks: list[BNStatsHook], cls: torch.Tensor,
           z: torch.Tensor, yi: torch.Tensor) -> tuple[float, float, float]:
    logits = logits_of(teacher, generator(z, cls[yi]), cls)
    bn = float(sum(h.loss for h in hooks)) if hooks else 0.0  # type: ignore[misc]
    return float(F.cross_entropy(logits, yi)), bn, float((logits.argmax(1) == yi).float().mean())


def synthesize(
    generator: Generator,
    teacher: nn.Module,
    student: nn.Module,
    classes: Sequence[int],
    cfg: SynthesisConfig,
    seed: int,
) -> SynthesisReport:
    """Train ``generator`` (in place) so that the frozen ``teacher`` sees its samples as the
    requested classes with the statistics of its BatchNorm layers; ``student`` (trained in place)
    supplies the adversarial term. Deterministic given ``seed`` (and the torch thread count)."""
    t0 = time.perf_counter()
    device = next(teacher.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    cls = torch.as_tensor(sorted(int(c) for c in classes), dtype=torch.int64, device=device)
    k = len(cls)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    hooks = bn_hooks(teacher)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_student)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, generator.nz, generator=gen).to(device)
        yi = torch.randint(k, (n,), generator=gen).to(device)
        return z, yi

    probe_z, probe_y = draw(max(cfg.batch_size, 2))
    generator.train()
    ce0, bn0, acc0 = _probe(generator, teacher, hooks, cls, probe_z, probe_y)
    try:
        for r in range(cfg.rounds):
            adversarial = cfg.adv > 0 and r >= cfg.warmup
            student.eval()
            for _ in range(cfg.generator_steps):
                z, yi = draw(cfg.batch_size)
                x = generator(z, cls[yi])
                t_logits = logits_of(teacher, x, cls)
                loss = cfg.oh * F.cross_entropy(t_logits, yi)
                if hooks and cfg.bn > 0:
                    loss = loss + cfg.bn * sum(h.loss for h in hooks)  # type: ignore[misc]
                if adversarial:
                    s_logits = logits_of(student, x, cls)
                    agree = (s_logits.argmax(1) == t_logits.argmax(1)).float()
                    loss = loss - cfg.adv * (kl_per_sample(t_logits, s_logits) * agree).mean()
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_g.step()
            if r < cfg.warmup or cfg.adv == 0:
                continue  # the student only serves the adversarial term
            student.train()
            for _ in range(cfg.student_steps):
                z, yi = draw(cfg.batch_size)
                with torch.no_grad():
                    x = generator(z, cls[yi])
                    t_logits = logits_of(teacher, x, cls)
                s_logits = logits_of(student, x, cls)
                loss_s = kl_per_sample(t_logits, s_logits, cfg.student_temperature).mean() * cfg.student_temperature ** 2
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
        ce1, bn1, acc1 = _probe(generator, teacher, hooks, cls, probe_z, probe_y)
        with torch.no_grad():
            student.eval()
            x = generator(probe_z, cls[probe_y])
            agreement = float((logits_of(student, x, cls).argmax(1) == logits_of(teacher, x, cls).argmax(1)).float().mean())
    finally:
        for h in hooks:
            h.remove()
    generator.eval()
    return SynthesisReport(time.perf_counter() - t0, k, ce0, ce1, bn0, bn1, acc0, acc1, agreement)


def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh parameters for every layer of ``model`` (the student starts untrained), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and m is not model:
                reset()
