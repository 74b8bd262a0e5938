"""FID-50K evaluation: ADM's five numbers for a stream of sample batches against a reference."""

import numpy as np

from .manifold import precision_recall
from .reference import Reference, load_reference, progress_bar
from .stats import FeatureAccumulator, frechet_distance, inception_score


def evaluate(batches, reference, extractor, progress=True, batch_size=100):
    """Evaluate uint8 NHWC sample batches (any iterable; consumed once, streaming).

    `reference` is a `Reference` or a path to one; `extractor` an `InceptionFeatures`. Returns
    `fid`, `sfid` (None without mu_s/sigma_s), `inception_score` (sequential splits of 5,000),
    `precision`, `recall` (k=3; None when the reference has no arr_0 images) and `num_samples`.
    The reference images are streamed through the extractor in batches of `batch_size`.
    """
    if not isinstance(reference, Reference):
        reference = load_reference(reference)
    samples = FeatureAccumulator()
    for batch in progress_bar(batches, "samples", progress):
        samples.update(extractor(batch))
    mu, sigma, mu_s, sigma_s = samples.stats()
    result = {
        "num_samples": samples.count,
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "sfid": None,
        "inception_score": inception_score(samples.probs),
        "precision": None,
        "recall": None,
    }
    if reference.mu_s is not None:
        result["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    if reference.num_images:
        total = -(-reference.num_images // batch_size)
        ref_batches = progress_bar(
            reference.image_batches(batch_size), "reference", progress, total
        )
        ref_pool = np.concatenate([extractor(b)["pool"].astype(np.float32) for b in ref_batches])
        result["precision"], result["recall"] = precision_recall(
            ref_pool, samples.pool, device=extractor.device
        )
    return result
