"""ADM's improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

Each set's manifold is the union of balls around its points, each ball's radius the distance to
that point's k-th nearest neighbour within the set (the point itself excluded). Precision is the
fraction of samples inside the reference manifold; recall the fraction of reference images
inside the sample manifold. Distances come in blocks of `batch_size` x `batch_size`, so 50k x 10k
(or 50k x 50k) matrices never exist at once. They are computed in fp32 with TF32 off; ADM uses
fp16 where finite, so borderline points can differ and the fractions agree to about 1e-3.
"""

import numpy as np
import torch

from .errors import MetricsError
from .inception import tf32_disabled


def _blocks(features, batch_size):
    for start in range(0, len(features), batch_size):
        yield start, features[start : start + batch_size]


def _squared_distances(a, b):
    """Pairwise squared Euclidean distances, |a|^2 - 2ab + |b|^2 clamped at 0 (as ADM)."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0)


def manifold_radii(features, k, batch_size):
    """Squared distance from each row to its k-th nearest other row (a running top-(k+1) over
    column blocks; the smallest entry is the row itself at distance 0)."""
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    for start, rows in _blocks(features, batch_size):
        nearest = None
        for _, cols in _blocks(features, batch_size):
            d = _squared_distances(rows, cols)
            if nearest is not None:
                d = torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        if nearest.shape[1] <= k:
            raise MetricsError(
                f"precision/recall with k={k} needs more than {k} images per set: pass more"
            )
        radii[start : start + len(rows)] = nearest[:, k]
    return radii


def precision_recall(ref_pool, sample_pool, k=3, batch_size=10_000, device="cpu"):
    """(precision, recall) of `sample_pool` against `ref_pool` (N x D feature arrays), ADM-style."""
    with torch.no_grad(), tf32_disabled():
        ref = torch.as_tensor(np.asarray(ref_pool, dtype=np.float32), device=device)
        sample = torch.as_tensor(np.asarray(sample_pool, dtype=np.float32), device=device)
        ref_radii = manifold_radii(ref, k, batch_size)
        sample_radii = manifold_radii(sample, k, batch_size)
        sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=device)
        ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
        for s0, srows in _blocks(sample, batch_size):
            s1 = s0 + len(srows)
            for r0, rrows in _blocks(ref, batch_size):
                r1 = r0 + len(rrows)
                d = _squared_distances(srows, rrows)
                sample_inside[s0:s1] |= (d <= ref_radii[None, r0:r1]).any(dim=1)
                ref_inside[r0:r1] |= (d <= sample_radii[s0:s1, None]).any(dim=0)
        return sample_inside.double().mean().item(), ref_inside.double().mean().item()
