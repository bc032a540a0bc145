"""Second-order prototypes: per-class sums of features and of their outer products, and the
classifiers built from them (``model.classifier: ncm | nme | mahalanobis | fecam | lda``).

A client's statistics of class ``c`` are ``n_c``, ``S_c = sum t(x)`` and ``Q_c = sum t(x) t(x)^T``
over its embedded samples ``x`` (float64), with ``t`` the classifier's feature transform (identity,
L2 normalisation or Tukey's power). They are sums, so merging clients' statistics by adding them
gives exactly the statistics of the pooled data when every client embeds with the same backbone,
and the classifier fitted on merged statistics is the classifier fitted on all the data at once.
The server keeps each client's latest statistics of each class (``strategies/base.py``,
``merge_second_order``), so the merge stays exact when only some clients take part in a round.

* ``ncm``: nearest class mean (the prototypes; the default, no statistics needed).
* ``nme``: iCaRL's nearest-mean-of-exemplars rule (Rebuffi et al. CVPR 2017; PyCIL
  ``models/base.py`` ``_eval_nme``): each embedding is L2-normalised, a class mean is the mean of
  the normalised embeddings, normalised again, and a test embedding (normalised) goes to the
  nearest such mean in squared Euclidean distance (equivalently the largest cosine). Clients
  upload counts and sums of their normalised embeddings (no outer products). With a replay
  memory the old classes' sums come from the exemplars, as in iCaRL. Deviations: the current
  task's classes are averaged over every sample the clients hold (iCaRL and PyCIL's
  ``_construct_exemplar`` average only the exemplars they keep); the means are pooled over the
  federation's clients (sums of normalised embeddings, so the pooled mean is exact); PyCIL adds
  1e-8 to each feature norm, protofed floors it at 1e-12.
* ``fecam`` (FeCAM, Goswami et al. NeurIPS 2023; estimator of the official
  ``dipamgoswami/FeCAM`` ``models/base.py``, ``models/fecam.py``, ``utils/maha_utils.py``, with its
  CIFAR-100 configuration ``tukey``, ``shrink``, ``norm_cov``, ``per_class``, beta 0.5, alpha1 =
  alpha2 = 1): statistics of Tukey-transformed, unnormalised embeddings ``t(x) = x^0.5``; per class
  the unbiased covariance ``C = (Q - n m m^T) / (n - 1)`` (``np.cov``) of ``t(x)``, shrunk twice
  (the official code shrinks once when it computes the covariance and once more before
  normalising): ``C + a1 V1 I + a2 V2 (1 - I)`` with ``V1`` the mean of the diagonal and ``V2`` the
  mean of the non-zero off-diagonal entries; then normalised to a correlation matrix
  ``C_ij / sqrt(C_ii C_jj)`` and pseudo-inverted. The class mean is the mean of the *raw*
  embeddings, Tukey-transformed, then L2-normalised (the official ``_protos`` hold raw means and
  ``_mahalanobis`` transforms and normalises them), so clients also upload the raw sums; a test
  embedding is L2-normalised, Tukey-transformed and L2-normalised again, and goes to the class of
  the smallest ``(x - mu)^T C^+ (x - mu)``. Deviations from the official code: (1) ``x^0.5`` is
  applied as the signed power ``sign(x) |x|^0.5``: FeCAM's ResNet features are non-negative (after a
  ReLU and average pooling), protofed's embeddings (a linear projection) take any sign, where the
  plain power gives NaN; on non-negative features the two agree; (2) FeCAM freezes its backbone
  after the first task and classifies that first task with its trained linear head's normalised
  weights and no Tukey transform; protofed uses the same estimator from the first task on
  (freeze with ``share_weights: first_task`` or ``continual.backbone``); (3) float64 throughout
  (the official pseudo-inverse is cast to float32); (4) a class with one sample divides its scatter
  by 1 instead of giving ``np.cov``'s NaN.
* ``mahalanobis`` (protofed's own variant, *not* FeCAM's estimator): statistics of L2-normalised
  embeddings (the clients normalise each embedding before summing), the covariance per class
  ``C_c = (Q_c - n_c mu_c mu_c^T) / (n_c - 1)`` with ``mu_c`` the mean of the normalised embeddings
  (not normalised again), shrunk once, ``C + g1 V1 I + g2 V2 (1 - I)`` (V1: mean of the diagonal,
  V2: mean of every off-diagonal entry, g1 = g2 = 1), normalised to a correlation matrix, and
  ``argmin_c (x - mu_c)^T C_c^+ (x - mu_c)`` (pseudo-inverse) on the L2-normalised test embedding.
  Where it differs from FeCAM: no Tukey transform, normalised instead of raw features in the
  covariance, one shrinkage instead of two, the class mean not re-normalised. The normalisations
  matter: without them (measured on the benchmark with a frozen backbone) the class with the
  widest covariance wins almost every sample (0.24 final accuracy against 0.64 for NCM).
* ``lda``: one shared within-class covariance ``W = sum_c (Q_c - n_c mu_c mu_c^T) / (N - C)``
  with shrinkage towards a scaled identity, ``(1 - l) W + l (tr W / D) I`` (``l`` 0.1, fixed), and
  the linear discriminant ``x^T W^-1 mu_c - mu_c^T W^-1 mu_c / 2`` (equal class priors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLASSIFIERS = ("ncm", "nme", "mahalanobis", "fecam", "lda")
SHRINK_WEIGHTS = (1.0, 1.0)  # FeCAM's alpha1, alpha2 (official CIFAR-100 / ImageNet configurations); mahalanobis uses them too
FECAM_SHRINKS = 2  # FeCAM applies its shrinkage twice
TUKEY_BETA = 0.5  # FeCAM's beta
LDA_SHRINKAGE = 0.1


@dataclass
class SecondOrderStats:
    """Per-class ``counts [C]``, ``sums [C, D]``, ``squares [C, D, D]`` (float64; ``None`` for a
    first-order classifier such as ``nme``) and ``raw_sums [C, D]`` (sums of the untransformed
    embeddings, ``fecam`` only; otherwise ``None``), classes sorted."""

    classes: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray | None
    raw_sums: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        sums = np.asarray(self.sums, dtype=np.float64)
        c = len(self.classes)
        d = int(sums.shape[-1]) if sums.ndim >= 1 and sums.size == 0 else int(sums.size // max(c, 1))
        self.sums = sums.reshape(c, d)
        order = np.argsort(self.classes, kind="stable")
        if self.squares is not None:
            self.squares = np.asarray(self.squares, dtype=np.float64).reshape(c, d, d)[order]
        if self.raw_sums is not None:
            self.raw_sums = np.asarray(self.raw_sums, dtype=np.float64).reshape(c, d)[order]
        self.classes, self.counts, self.sums = self.classes[order], self.counts[order], self.sums[order]

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return int(self.sums.shape[1])

    @classmethod
    def empty(cls, dim: int, squares: bool = True, raw: bool = False) -> "SecondOrderStats":
        return cls(np.zeros(0), np.zeros(0), np.zeros((0, dim)), np.zeros((0, dim, dim)) if squares else None,
                   np.zeros((0, dim)) if raw else None)

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray, labels: np.ndarray, normalize: bool = False, *,
           squares: bool = True, raw_features: np.ndarray | None = None) -> "SecondOrderStats":
        """Statistics of ``features`` (each row L2-normalised first with ``normalize``); without
        ``squares`` only counts and sums; with ``raw_features`` (one row per feature row) also
        their per-class sums."""
        f = _as_array(features)
        if normalize and f.size:
            f = l2_normalize(f)
        raw = None if raw_features is None else _as_array(raw_features)
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            return cls.empty(f.shape[1] if f.ndim == 2 else 0, squares, raw is not None)
        classes = np.unique(labels)
        masks = [labels == c for c in classes]
        return cls(
            classes, np.array([int(m.sum()) for m in masks]), np.stack([f[m].sum(0) for m in masks]),
            np.stack([f[m].T @ f[m] for m in masks]) if squares else None,
            None if raw is None else np.stack([raw[m].sum(0) for m in masks]),
        )

    def _take(self, rows: np.ndarray) -> "SecondOrderStats":
        return SecondOrderStats(
            self.classes[rows], self.counts[rows], self.sums[rows],
            None if self.squares is None else self.squares[rows],
            None if self.raw_sums is None else self.raw_sums[rows],
        )

    def select(self, classes) -> "SecondOrderStats":
        return self._take(np.isin(self.classes, np.asarray(list(classes), dtype=np.int64)))

    def updated_with(self, other: "SecondOrderStats") -> "SecondOrderStats":
        """This set with the classes of ``other`` replaced or added."""
        if len(other) == 0:
            return self
        if len(self) == 0:
            return other
        _same_layout(self, other)
        kept = self._take(~np.isin(self.classes, other.classes))
        return SecondOrderStats(
            np.concatenate([kept.classes, other.classes]),
            np.concatenate([kept.counts, other.counts]),
            np.concatenate([kept.sums, other.sums]),
            None if other.squares is None else np.concatenate([kept.squares, other.squares]),
            None if other.raw_sums is None else np.concatenate([kept.raw_sums, other.raw_sums]),
        )

    @property
    def means(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)[:, None]

    def scatter(self) -> np.ndarray:
        """Per-class within-class scatter ``Q_c - n_c mu_c mu_c^T`` ``[C, D, D]``."""
        if self.squares is None:
            raise ValueError("these statistics carry no sums of outer products")
        mu = self.means
        return self.squares - self.counts[:, None, None] * np.einsum("ci,cj->cij", mu, mu)


def _as_array(features: torch.Tensor | np.ndarray) -> np.ndarray:
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    return f.astype(np.float64, copy=False)  # no second copy of what is float64 already


def _same_layout(a: SecondOrderStats, b: SecondOrderStats) -> None:
    if (a.squares is None) != (b.squares is None) or (a.raw_sums is None) != (b.raw_sums is None):
        raise ValueError("statistics of different classifiers cannot be merged")


def l2_normalize(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def tukey(f: np.ndarray) -> np.ndarray:
    """Tukey's ladder of powers with FeCAM's beta 0.5, as a signed power (module docstring)."""
    return np.sign(f) * np.abs(f) ** TUKEY_BETA


def client_statistics(features: torch.Tensor | np.ndarray, labels: np.ndarray, kind: str) -> SecondOrderStats:
    """What a client uploads for ``model.classifier: kind`` (module docstring)."""
    f = _as_array(features)
    if kind == "nme":
        return SecondOrderStats.of(f, labels, normalize=True, squares=False)
    if kind == "mahalanobis":
        return SecondOrderStats.of(f, labels, normalize=True)
    if kind == "fecam":
        return SecondOrderStats.of(tukey(f), labels, raw_features=f)
    if kind == "lda":
        return SecondOrderStats.of(f, labels)
    raise ValueError(f"classifier {kind!r} uploads no statistics")


def merge_stats(sets: list[SecondOrderStats]) -> SecondOrderStats:
    """Class-wise sums over several clients' statistics, in the order given (exact pooling)."""
    sets = [s for s in sets if len(s)]
    if not sets:
        return SecondOrderStats.empty(0)
    for s in sets[1:]:
        _same_layout(sets[0], s)
    classes = np.unique(np.concatenate([s.classes for s in sets]))
    d = sets[0].dim
    counts = np.zeros(len(classes), np.int64)
    sums = np.zeros((len(classes), d))
    squares = None if sets[0].squares is None else np.zeros((len(classes), d, d))
    raw = None if sets[0].raw_sums is None else np.zeros((len(classes), d))
    for s in sets:
        rows = np.searchsorted(classes, s.classes)
        counts[rows] += s.counts
        sums[rows] += s.sums
        if squares is not None:
            squares[rows] += s.squares
        if raw is not None:
            raw[rows] += s.raw_sums
    return SecondOrderStats(classes, counts, sums, squares, raw)


def _shrink(c: np.ndarray, a1: float, a2: float, nonzero_off_diagonal: bool) -> np.ndarray:
    """``C + a1 V1 I + a2 V2 (1 - I)``; ``V2`` over the non-zero off-diagonal entries (FeCAM's
    ``shrink_cov``) or over all of them (protofed's mahalanobis)."""
    d = len(c)
    eye = np.eye(d)
    v1 = float(np.trace(c)) / d
    off = c[~eye.astype(bool)]
    if nonzero_off_diagonal:
        off = off[off != 0.0]
    v2 = float(off.mean()) if off.size else 0.0
    return c + a1 * v1 * eye + a2 * v2 * (1.0 - eye)


def _correlation(c: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.maximum(np.diag(c), 1e-12))
    return c / np.outer(sd, sd)


def _class_correlations(stats: SecondOrderStats, shrinks: int, nonzero_off_diagonal: bool) -> np.ndarray:
    """Per-class covariances, shrunk ``shrinks`` times (weights ``SHRINK_WEIGHTS``), normalised to
    correlation matrices ``[C, D, D]``."""
    cov = stats.scatter() / np.maximum(stats.counts - 1, 1)[:, None, None]
    out = []
    for c in cov:
        for _ in range(shrinks):
            c = _shrink(c, *SHRINK_WEIGHTS, nonzero_off_diagonal=nonzero_off_diagonal)
        out.append(_correlation(c))
    return np.stack(out) if out else cov


def mahalanobis_correlations(stats: SecondOrderStats) -> np.ndarray:
    """protofed's ``mahalanobis`` (not FeCAM's estimator, module docstring): shrunk once."""
    return _class_correlations(stats, 1, nonzero_off_diagonal=False)


def fecam_correlations(stats: SecondOrderStats) -> np.ndarray:
    """``fecam``: of the (Tukey-transformed) statistics, shrunk twice as FeCAM's ``shrink_cov``."""
    return _class_correlations(stats, FECAM_SHRINKS, nonzero_off_diagonal=True)


def lda_covariance(stats: SecondOrderStats) -> np.ndarray:
    """The shrunk shared within-class covariance ``[D, D]``."""
    dof = max(int(stats.counts.sum()) - len(stats), 1)
    w = stats.scatter().sum(0) / dof
    d = stats.dim
    return (1.0 - LDA_SHRINKAGE) * w + LDA_SHRINKAGE * (float(np.trace(w)) / d) * np.eye(d)


def query_features(kind: str, features: np.ndarray) -> np.ndarray:
    """A test embedding as the classifier ``kind`` compares it with its class means."""
    x = np.asarray(features, dtype=np.float64)
    if kind in ("nme", "mahalanobis"):
        return l2_normalize(x)
    if kind == "fecam":  # FeCAM's _eval_maha normalises, _maha_dist transforms, _mahalanobis normalises
        return l2_normalize(tukey(l2_normalize(x)))
    return x


@dataclass
class FittedClassifier:
    """A classifier fitted on statistics: ``predict(features)`` returns class ids."""

    kind: str
    classes: np.ndarray
    means: np.ndarray  # [C, D]
    precisions: np.ndarray | None  # [C, D, D] (mahalanobis, fecam), [D, D] (lda), None (nme)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``[N, C]``: higher is more likely."""
        x = query_features(self.kind, features)
        if self.kind == "lda":
            a = self.means @ self.precisions  # [C, D]
            return x @ a.T - 0.5 * np.einsum("cd,cd->c", a, self.means)[None, :]
        if self.kind == "nme":
            return -((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        out = np.empty((len(x), len(self.classes)))
        for i, (mu, p) in enumerate(zip(self.means, self.precisions)):
            diff = x - mu
            out[:, i] = -np.einsum("nd,de,ne->n", diff, p, diff)
        return out

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
        return self.classes[np.argmax(self.scores(f), axis=1)]


def fit_classifier(stats: SecondOrderStats, kind: str) -> FittedClassifier:
    if len(stats) == 0:
        raise ValueError("no statistics to fit a classifier on")
    means, prec = stats.means, None
    if kind == "nme":
        means = l2_normalize(stats.means)
    elif kind == "mahalanobis":
        prec = np.stack([np.linalg.pinv(c, hermitian=True) for c in mahalanobis_correlations(stats)])
    elif kind == "fecam":
        if stats.raw_sums is None:
            raise ValueError("fecam needs the raw sums of the embeddings")
        means = l2_normalize(tukey(stats.raw_sums / np.maximum(stats.counts, 1)[:, None]))
        prec = np.stack([np.linalg.pinv(c, hermitian=True) for c in fecam_correlations(stats)])
    elif kind == "lda":
        prec = np.linalg.pinv(lda_covariance(stats), hermitian=True)
    else:
        raise ValueError(f"unknown second-order classifier {kind!r}")
    return FittedClassifier(kind, stats.classes.copy(), means, prec)
