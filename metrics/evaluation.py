"""FID-50K evaluation: ADM's five numbers for a stream of sample batches against a reference,
and for a samples file, with its JSON report."""

import json

import numpy as np

from common import atomic_write, iter_npz_array, npz_array_info

from .demo_classifier import demo_metrics, load_or_train
from .errors import MetricsError
from .inception import InceptionFeatures
from .manifold import precision_recall
from .reference import Reference, load_reference, progress_bar
from .stats import FeatureAccumulator, frechet_distance, inception_score


def evaluate(batches, reference, extractor, progress=True, batch_size=100, pr_distances="float16"):
    """Evaluate uint8 NHWC sample batches (any iterable; consumed once, streaming).

    `reference` is a `Reference` or a path to one; `extractor` an `InceptionFeatures`. Returns
    `fid`, `sfid` (None without mu_s/sigma_s), `inception_score` (sequential splits of 5,000),
    `precision`, `recall` (k=3; None when the reference has no arr_0 images), `pr_distances`
    (float16 as ADM's evaluator, or float32; see metrics.manifold) and `num_samples`. The
    reference images are streamed through the extractor in batches of `batch_size`.
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
        "pr_distances": pr_distances,
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
            ref_pool, samples.pool, device=extractor.device, distances=pr_distances
        )
    return result


METRIC_NAMES = {
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "Inception Score",
    "precision": "Precision",
    "recall": "Recall",
    "pr_distances": "precision/recall distances",
    "class_accuracy": "class accuracy (demo classifier)",
    "real_accuracy": "class accuracy of real images",
    "frechet_distance": "Frechet distance (demo classifier features)",
    "class_accuracy_bootstrap_se": "class accuracy: evaluation noise (bootstrap SE)",
    "frechet_distance_bootstrap_se": "Frechet distance: evaluation noise (bootstrap SE)",
    "num_samples": "samples",
}


def evaluate_file(
    samples_path,
    ref,
    *,
    num_classes=None,
    expected_count=None,
    inception_weights=None,
    device="cpu",
    batch_size=100,
    progress=False,
    pr_distances="float16",
) -> dict:
    """The metrics of a samples .npz (arr_0: uint8 N x H x W x 3) against `ref`: an ADM
    reference (a Reference or its .npz path), or "synthetic" for models of the built-in
    shapes, scored by the demo classifier (class accuracy against arr_1's labels, Frechet
    distance in its features)."""
    shape, dtype = npz_array_info(samples_path)
    if len(shape) != 4 or shape[-1] != 3 or dtype != "uint8":
        raise MetricsError(
            f"{samples_path}: arr_0 is {dtype} {tuple(shape)}; samples must be uint8 N x H x W x 3"
        )
    if expected_count is not None and shape[0] != expected_count:
        raise MetricsError(f"{samples_path} holds {shape[0]} images, not {expected_count}")
    if ref == "synthetic":
        scorer = load_or_train(shape[1], num_classes or 10)
        images = iter_npz_array(samples_path, "arr_0", batch_size)
        labels = iter_npz_array(samples_path, "arr_1", batch_size)
        return demo_metrics(zip(images, labels, strict=True), scorer)
    extractor = InceptionFeatures(inception_weights, device=device)
    batches = iter_npz_array(samples_path, batch_size=batch_size)
    return evaluate(batches, ref, extractor, progress=progress, pr_distances=pr_distances)


def write_report(report: dict, json_path) -> str:
    """Write `report` (settings and "metrics") as JSON, atomically; returns the metrics as a
    Markdown table."""
    with atomic_write(json_path, "w") as f:
        json.dump(report, f, indent=1)
    lines = ["| metric | value |", "|---|---|"]
    for key, name in METRIC_NAMES.items():
        if key in report["metrics"]:
            value = report["metrics"][key]
            text = (
                "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else value)
            )
            lines.append(f"| {name} | {text} |")
    return "\n".join(lines)
