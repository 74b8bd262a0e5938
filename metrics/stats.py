"""Feature statistics and the distances ADM's evaluator reports: FID/sFID and Inception Score."""

import numpy as np

from .errors import MetricsError


def softmax(logits):
    """Row-wise softmax in float64 (ADM: softmax of the bias-free 1008-way Inception logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class _MomentAccumulator:
    """Streaming mean and ddof=1 covariance in float64 by Chan's pairwise merge, which stays exact
    where `sum(x x^T) - n mu mu^T` would cancel catastrophically for features with a large mean."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None  # sum of outer products of deviations from the running mean

    def update(self, x):
        x = np.asarray(x, dtype=np.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        m2 = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + np.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def stats(self):
        if self.count < 2:
            raise MetricsError(
                f"statistics need at least 2 images, got {self.count}: pass more samples"
            )
        return self.mean, self.m2 / (self.count - 1)


class FeatureAccumulator:
    """Consumes `InceptionFeatures` outputs batch by batch.

    Keeps running float64 moments of `pool` and `spatial` (so 50k images never sit in memory),
    plus, if `keep_per_image`, the pool features (float32, for precision/recall) and softmax
    probabilities (float32, for Inception Score), which ADM's metrics need per image. Reference
    statistics over a whole training set keep only the moments.
    """

    def __init__(self, keep_per_image=True):
        self.keep_per_image = keep_per_image
        self._pool = _MomentAccumulator()
        self._spatial = _MomentAccumulator()
        self._pool_rows = []
        self._prob_rows = []

    def update(self, features):
        self._pool.update(features["pool"])
        self._spatial.update(features["spatial"])
        if not self.keep_per_image:
            return
        self._pool_rows.append(np.asarray(features["pool"], dtype=np.float32))
        self._prob_rows.append(softmax(features["logits"]).astype(np.float32))

    @property
    def count(self):
        return self._pool.count

    @property
    def pool(self):
        return np.concatenate(self._pool_rows)

    @property
    def probs(self):
        return np.concatenate(self._prob_rows)

    def stats(self):
        """(mu, sigma, mu_s, sigma_s): float64 means and np.cov-equal (ddof=1) covariances."""
        mu, sigma = self._pool.stats()
        mu_s, sigma_s = self._spatial.stats()
        return mu, sigma, mu_s, sigma_s


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)).

    ADM's evaluator takes scipy's `sqrtm(S1 @ S2)` of the non-symmetric product. Here
    tr sqrt(S1 S2) = tr sqrt(R S2 R) with R = S1^(1/2): a symmetric PSD matrix whose eigenvalues
    `eigh` finds in ~1 s at 2048-d (sqrtm takes 20-35 s) and without sqrtm's spurious imaginary
    parts; the two agree far below FID's reported precision.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}: use a reference computed with the same Inception features"
        )
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    if values.min() < -1e-6 * max(abs(values).max(), 1e-30):
        raise MetricsError(
            f"FID: a covariance has eigenvalue {values.min():.3g} < 0, so it is not positive "
            "semi-definite: recompute the statistics"
        )
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ ((sigma2 + sigma2.T) / 2) @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(probs, split_size=5000):
    """ADM's Inception Score: mean over splits of exp(E_x KL(p(y|x) || p(y))).

    Splits are consecutive, unshuffled runs of `split_size` images in input order (the last one
    may be shorter): 50,000 samples give ADM's 10 splits of 5,000. torch-fidelity instead shuffles
    and cuts N into 10 equal parts, which gives slightly different numbers.
    """
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: a probability that underflowed contributes nothing (ADM would give nan).
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))
