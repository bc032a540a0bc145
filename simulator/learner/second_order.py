"""Second-order prototypes: per-class sums of features and of their outer products, and the
classifiers built from them (``model.classifier: ncm | nme | mahalanobis | fecam | lda | ranpac``).

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
* ``ranpac`` (RanPAC, McDonnell et al. NeurIPS 2023; official ``RanPAC/RanPAC`` ``RanPAC.py``
  ``setup_RP`` / ``replace_fc`` / ``optimise_ridge_parameter`` and ``inc_net.py`` ``CosineLinear``
  with ``W_rand``): each embedding ``x`` goes through a frozen random projection with a ReLU,
  ``h = max(0, x W)``, ``W`` of shape ``[D, M]`` with N(0, 1) entries (``model.ranpac_dim`` = M), and
  a ridge regression of the one-hot labels on ``h`` is the classifier: ``W_o = (G + l I)^-1 Q`` with
  the Gram matrix ``G = sum h h^T`` and ``Q = sum h y^T`` over every sample of every class so far,
  and a test sample goes to ``argmax_c h^T W_o[:, c]``. Clients upload per-class ``n_c``,
  ``sum h`` (a column of ``Q``) and ``sum h h^T`` (``G`` is their sum over classes), so the
  federated classifier is exactly the central one. Deviations from the official code: (1) the ridge
  ``l`` is chosen from the same grid ``10^-8 .. 10^8`` by generalised cross-validation on the
  merged statistics (Golub, Heath & Wahba 1979: ``N RSS(l) / (N - tr H(l))^2``, computable from
  ``G``, ``Q`` and the counts alone), where the official code fits on the first 80% of the current
  task's samples and scores the mean squared error on the other 20%; a hold-out split would need
  a second set of uploads, and GCV over all the data so far is exact under federation. Measured
  (central RanPAC on the quickstart's mnist1d with its frozen, randomly initialised cnn1d, seeds
  0, 1, 2; ``tests/test_ranpac.py``): final average accuracy 0.5998 / 0.5998, 0.5348 / 0.5348,
  0.5285 / 0.5341 with GCV / the hold-out; (2) ``M`` defaults to 256 rather than the
  paper's 10,000 (its ViT features have 768 dimensions; protofed's embeddings are 64 by default),
  because every client uploads one ``M x M`` upper triangle per class: ``M (M + 1) / 2`` float64,
  263 KB per class at 256 (plus the class sums); (3) ``W`` is drawn by numpy from the run seed (every client and the
  server draw the same matrix) instead of ``torch.randn``; (4) no first-session adaptation of the
  backbone (RanPAC's phase 1, which is APER's): combine with ``share_weights: first_task`` to train
  the backbone federatedly during the first task and freeze it after.
* ``lda``: one shared within-class covariance ``W = sum_c (Q_c - n_c mu_c mu_c^T) / (N - C)``
  with shrinkage towards a scaled identity, ``(1 - l) W + l (tr W / D) I`` (``l`` 0.1, fixed), and
  the linear discriminant ``x^T W^-1 mu_c - mu_c^T W^-1 mu_c / 2`` (equal class priors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLASSIFIERS = ("ncm", "nme", "mahalanobis", "fecam", "lda", "ranpac")
SHRINK_WEIGHTS = (1.0, 1.0)  # FeCAM's alpha1, alpha2 (official CIFAR-100 / ImageNet configurations); mahalanobis uses them too
FECAM_SHRINKS = 2  # FeCAM applies its shrinkage twice
TUKEY_BETA = 0.5  # FeCAM's beta
LDA_SHRINKAGE = 0.1
RANPAC_RIDGES = 10.0 ** np.arange(-8, 9)  # the official optimise_ridge_parameter grid


@dataclass
class SecondOrderStats:
    """Per-class ``counts [C]``, ``sums [C, D]``, ``squares [C, D, D]`` (float64; ``None`` for a
    first-order classifier such as ``nme``) and ``raw_sums [C, D]`` (sums of the untransformed
    embeddings, ``fecam`` only; otherwise ``None``), classes sorted. ``gram [D, D]``: the sum of
    ``squares`` over the classes, carried instead of them where only the sum is needed (what the
    server sends to ``ranpac`` clients, :meth:`pooled`)."""

    classes: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray | None
    raw_sums: np.ndarray | None = None
    gram: np.ndarray | None = None

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
        if self.gram is not None:
            self.gram = np.asarray(self.gram, dtype=np.float64).reshape(d, d)
        self.classes, self.counts, self.sums = self.classes[order], self.counts[order], self.sums[order]

    def pooled(self) -> "SecondOrderStats":
        """The same statistics with the per-class ``squares`` replaced by their sum ``gram``."""
        if self.squares is None:
            return self
        return SecondOrderStats(self.classes, self.counts, self.sums, None, self.raw_sums, self.squares.sum(0))

    def total_gram(self) -> np.ndarray:
        """``sum_c squares_c``: carried (``gram``) or summed here."""
        if self.gram is not None:
            return self.gram
        if self.squares is None:
            raise ValueError("these statistics carry no sums of outer products")
        return self.squares.sum(0)

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
        if self.gram is not None:
            if not np.all(rows):
                raise ValueError("a pooled Gram matrix cannot be restricted to fewer classes")
            return self
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
    if a.gram is not None or b.gram is not None:
        raise ValueError("pooled statistics (a summed Gram matrix) cannot be merged class by class")
    if (a.squares is None) != (b.squares is None) or (a.raw_sums is None) != (b.raw_sums is None):
        raise ValueError("statistics of different classifiers cannot be merged")


def l2_normalize(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def tukey(f: np.ndarray) -> np.ndarray:
    """Tukey's ladder of powers with FeCAM's beta 0.5, as a signed power (module docstring)."""
    return np.sign(f) * np.abs(f) ** TUKEY_BETA


def ranpac_projection(dim: int, width: int, seed: int) -> np.ndarray:
    """RanPAC's frozen random matrix ``W [dim, width]`` with N(0, 1) entries, a pure function of
    ``seed``: every client and the server draw the same one."""
    return np.random.default_rng(seed).standard_normal((dim, width))


def ranpac_features(features: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``h = max(0, x W)``: the randomly projected, rectified embeddings."""
    return np.maximum(np.asarray(features, dtype=np.float64) @ projection, 0.0)


def client_statistics(features: torch.Tensor | np.ndarray, labels: np.ndarray, kind: str,
                      projection: np.ndarray | None = None) -> SecondOrderStats:
    """What a client uploads for ``model.classifier: kind`` (module docstring); ``ranpac`` needs
    its ``projection``."""
    f = _as_array(features)
    if kind == "ranpac":
        if projection is None:
            raise ValueError("ranpac needs its random projection")
        return SecondOrderStats.of(ranpac_features(f, projection), labels)
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


def ranpac_ridge(stats: SecondOrderStats) -> float:
    """The ridge of :data:`RANPAC_RIDGES` with the smallest generalised cross-validation score
    ``N RSS(l) / (N - df(l))^2`` of the one-hot regression on the statistics (module docstring).
    With ``G = V diag(e) V^T`` and ``R = V^T Q``: ``df = sum e / (e + l)`` and
    ``RSS = N - 2 sum |R_i|^2 / (e_i + l) + sum e_i |R_i|^2 / (e_i + l)^2`` (``|Y|^2 = N`` for
    one-hot rows); the first of equal scores (the smallest ridge) wins."""
    e, v = np.linalg.eigh(stats.total_gram())
    e = np.maximum(e, 0.0)
    r2 = ((v.T @ stats.sums.T) ** 2).sum(1)  # |R_i|^2 over the classes
    n = float(stats.counts.sum())
    scores = []
    for lam in RANPAC_RIDGES:
        df = float((e / (e + lam)).sum())
        rss = max(n - 2.0 * float((r2 / (e + lam)).sum()) + float((e * r2 / (e + lam) ** 2).sum()), 0.0)
        scores.append(n * rss / (n - df) ** 2 if n - df > 1e-9 else np.inf)
    return float(RANPAC_RIDGES[int(np.argmin(scores))])


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
    precisions: np.ndarray | None  # [C, D, D] (mahalanobis, fecam), [D, D] (lda), None (nme, ranpac)
    projection: np.ndarray | None = None  # ranpac: the random matrix [D, M]
    readout: np.ndarray | None = None  # ranpac: the ridge solution W_o [M, C]
    ridge: float | None = None  # ranpac: the chosen ridge

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``[N, C]``: higher is more likely."""
        if self.kind == "ranpac":
            return ranpac_features(features, self.projection) @ self.readout
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


def fit_ranpac(stats: SecondOrderStats, projection: np.ndarray) -> FittedClassifier:
    """RanPAC's ridge classifier ``W_o = (G + l I)^-1 Q`` on the merged statistics of ``h``."""
    if (stats.squares is None and stats.gram is None) or projection.shape[1] != stats.dim:
        raise ValueError(f"ranpac needs sums of outer products of {projection.shape[1]}-d projected features")
    lam = ranpac_ridge(stats)
    gram = stats.total_gram()
    readout = np.linalg.solve(gram + lam * np.eye(len(gram)), stats.sums.T)  # solve, as the official code
    return FittedClassifier("ranpac", stats.classes.copy(), stats.means, None, projection, readout, lam)


def fit_classifier(stats: SecondOrderStats, kind: str, projection: np.ndarray | None = None) -> FittedClassifier:
    """The classifier ``kind`` fitted on ``stats`` (``ranpac`` also needs its ``projection``)."""
    if len(stats) == 0:
        raise ValueError("no statistics to fit a classifier on")
    if kind == "ranpac":
        if projection is None:
            raise ValueError("ranpac needs its random projection")
        return fit_ranpac(stats, projection)
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
