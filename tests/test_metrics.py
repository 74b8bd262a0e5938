"""Tests for metrics/: ADM-compatible FID, sFID, Inception Score and precision/recall.

The real Inception weights cannot be downloaded here, so a randomly initialised torch-fidelity
Inception is saved to a file and loaded through the same `weights_path` route real runs use.
Every number is checked against an independent numpy/scipy computation on the same features.
"""

import shutil
from urllib.error import URLError

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch_fidelity import feature_extractor_inceptionv3 as tfi

from common import iter_npz_array
from metrics import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    FeatureAccumulator,
    InceptionFeatures,
    MetricsError,
    evaluate,
    frechet_distance,
    inception_score,
    load_reference,
    precision_recall,
    write_reference,
)

N_SAMPLES, N_REF, KEEP = 32, 24, 16
SAMPLE_BATCHES = (7, 16, 1, 8)  # uneven on purpose
REF_BATCHES = (9, 3, 12)


# ---------------------------------------------------------------- independent reference code


def low_rank_fid(x1, x2):
    """FID of two feature sets without any matrix square root: with A_i the centred features
    scaled by 1/sqrt(n_i - 1), S_i = A_i^T A_i and tr sqrtm(S1 S2) is the nuclear norm of A1 A2^T
    (an n1 x n2 matrix), so no 2048-d sqrtm or eigendecomposition is needed."""
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = x1.mean(0) - x2.mean(0)
    return diff @ diff + (a1**2).sum() + (a2**2).sum() - 2 * tr_covmean


def brute_force_is(probs, split_size):
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0)
        kls = [
            sum(p * np.log(p / q) for p, q in zip(row, marginal, strict=True) if p > 0)
            for row in part
        ]
        scores.append(np.exp(np.mean(kls)))
    return np.mean(scores)


def brute_force_pr(ref, sample, k):
    def sq_dist(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(sq_dist(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    sample_radii = np.sort(sq_dist(sample, sample), axis=1)[:, k]
    d = sq_dist(sample, ref)
    precision = (d <= ref_radii[None, :]).any(axis=1).mean()
    recall = (d <= sample_radii[:, None]).any(axis=0).mean()
    return precision, recall


def batches_of(images, sizes):
    start = 0
    for size in sizes:
        yield images[start : start + size]
        start += size
    assert start == len(images)


def assert_one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def extractor(weights_file):
    return InceptionFeatures(weights_path=weights_file)


@pytest.fixture(scope="module")
def images():
    """Flat colours under noise of per-image strength; the two sets differ in both."""
    rng = np.random.default_rng(0)

    def make(n, h, w, low, high, amplitude):
        colour = rng.integers(low, high, (n, 1, 1, 3))
        noise = rng.uniform(-1, 1, (n, h, w, 3)) * rng.uniform(0, amplitude, (n, 1, 1, 1))
        return np.clip(colour + noise, 0, 255).astype(np.uint8)

    return make(N_SAMPLES, 32, 32, 0, 256, 160), make(N_REF, 40, 48, 40, 216, 60)


class Recorder:
    """Wraps the extractor and keeps every feature batch it returns, so the expected numbers are
    computed from exactly the features the code under test saw (Inception runs once per image)."""

    def __init__(self, extractor):
        self.extractor, self.device, self.parts = extractor, extractor.device, []

    def __call__(self, images):
        self.parts.append(self.extractor(images))
        return self.parts[-1]

    def take(self):
        parts, self.parts = self.parts, []
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------- feature extractor


def test_features_have_adm_shapes_and_match_torch_fidelity(extractor, weights_file):
    """pool_3 and bias-free logits equal torch-fidelity's own outputs on the NCHW batch (so the
    NHWC->NCHW transpose is right on non-square images), and logits = pool @ fc.weight.T."""
    imgs = np.random.default_rng(1).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    out = extractor(imgs)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "pool": ((3, 2048), np.float64),
        "spatial": ((3, 2023), np.float64),
        "logits": ((3, 1008), np.float64),
    }
    fidelity = tfi.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], weights_file
    )
    with torch.no_grad():
        pool, logits = fidelity(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    np.testing.assert_allclose(out["pool"], pool.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
    weight = extractor.model.fc.weight.double().numpy()
    np.testing.assert_allclose(out["logits"], out["pool"] @ weight.T, rtol=1e-5, atol=1e-4)
    assert out["pool"].std() > 0.05 and np.isfinite(out["spatial"]).all()


def test_spatial_features_are_mixed_6d_branch1x1_in_hwc_order(extractor):
    captured = {}

    def hook(module, inputs, output):
        captured["map"] = output.detach().clone()

    handle = extractor.model.Mixed_6d.branch1x1.register_forward_hook(hook)
    try:
        imgs = np.random.default_rng(2).integers(0, 256, (2, 36, 28, 3), dtype=np.uint8)
        out = extractor(imgs)
    finally:
        handle.remove()
    fmap = captured["map"]
    assert fmap.shape == (2, 192, 17, 17)
    hwc = fmap[:, :7].permute(0, 2, 3, 1).reshape(2, -1).double().numpy()
    chw = fmap[:, :7].reshape(2, -1).double().numpy()
    np.testing.assert_array_equal(out["spatial"], hwc)
    assert not np.allclose(out["spatial"], chw)


def test_extraction_runs_without_tf32_and_restores_the_flags(extractor):
    seen = []
    hook = extractor.model.Mixed_6d.register_forward_hook(
        lambda *args: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        )
    )
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        extractor(np.zeros((1, 16, 16, 3), np.uint8))
        after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    finally:
        hook.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    assert seen == [(False, False)]
    assert after == (True, True)


# ---------------------------------------------------------------- statistics and distances


def test_accumulator_equals_numpy_across_uneven_batches():
    rng = np.random.default_rng(3)
    pool = 1000.0 + rng.normal(size=(61, 12)) @ rng.normal(size=(12, 12))  # large mean
    spatial = rng.normal(size=(61, 5))
    logits = 3 * rng.normal(size=(61, 9))
    acc = FeatureAccumulator()
    start = 0
    for size in (1, 7, 13, 2, 38):
        sl = slice(start, start + size)
        acc.update({"pool": pool[sl], "spatial": spatial[sl], "logits": logits[sl]})
        start += size
    mu, sigma, mu_s, sigma_s = acc.stats()
    assert acc.count == 61
    np.testing.assert_allclose(mu, pool.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(pool, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mu_s, spatial.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sigma_s, np.cov(spatial, rowvar=False), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(acc.pool, pool.astype(np.float32))
    np.testing.assert_allclose(acc.probs, softmax(logits, axis=1), rtol=1e-6)


def test_accumulator_needs_two_samples():
    acc = FeatureAccumulator()
    acc.update({"pool": np.ones((1, 3)), "spatial": np.ones((1, 2)), "logits": np.ones((1, 4))})
    with pytest.raises(MetricsError) as excinfo:
        acc.stats()
    assert_one_line_error(excinfo, "at least 2")


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(diagonal, rel=1e-10)
    x1 = rng.normal(size=(30, 10)) @ rng.normal(size=(10, 10))
    x2 = 0.5 + rng.normal(size=(45, 10))
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (x1, x2)]
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(low_rank_fid(x1, x2), rel=1e-9)
    assert frechet_distance(*stats[0], *stats[0]) == pytest.approx(0, abs=1e-9)
    # Fewer samples than dimensions (rank-deficient, as with few Inception features): still ~0.
    x3 = rng.normal(size=(8, 40))
    mu3, sigma3 = x3.mean(0), np.cov(x3, rowvar=False)
    assert abs(frechet_distance(mu3, sigma3, mu3, sigma3)) < 1e-6 * np.trace(sigma3)
    x4 = rng.normal(size=(11, 40))
    fid34 = frechet_distance(mu3, sigma3, x4.mean(0), np.cov(x4, rowvar=False))
    assert fid34 == pytest.approx(low_rank_fid(x3, x4), rel=1e-6)
    # ADM's formula, scipy's sqrtm of the non-symmetric product, on full-rank 64-d statistics
    from scipy import linalg

    x5, x6 = rng.normal(size=(300, 64)), 0.3 + 1.2 * rng.normal(size=(200, 64))
    (m5, s5), (m6, s6) = [(x.mean(0), np.cov(x, rowvar=False)) for x in (x5, x6)]
    adm = (m5 - m6) @ (m5 - m6) + np.trace(s5 + s6) - 2 * np.trace(linalg.sqrtm(s5 @ s6).real)
    assert frechet_distance(m5, s5, m6, s6) == pytest.approx(adm, rel=1e-9)


def test_frechet_distance_rejects_indefinite_covariances_and_mismatched_shapes():
    with pytest.raises(MetricsError) as excinfo:
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    assert_one_line_error(excinfo, "not positive semi-definite")
    with pytest.raises(MetricsError) as excinfo:
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    assert_one_line_error(excinfo, "do not match")


def test_inception_score_uses_sequential_splits():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(10, 0.3), size=23)
    score = inception_score(probs, split_size=5)
    assert score == pytest.approx(brute_force_is(probs, 5), rel=1e-12)
    assert score != pytest.approx(brute_force_is(probs, 23))
    # The same ten one-hot predictions in two orders: splits of 5 taken in order see 5 classes
    # each (IS 5), or, sorted by class, 3 classes with weights .4/.4/.2 each (IS 2.5^.8 * 5^.2).
    # An implementation that shuffles (or ignores order) cannot give both.
    one_hot = np.eye(5)[[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert inception_score(one_hot, split_size=5) == pytest.approx(5.0)
    sorted_hot = np.eye(5)[[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]
    assert inception_score(sorted_hot, split_size=5) == pytest.approx(brute_force_is(sorted_hot, 5))
    assert inception_score(sorted_hot, split_size=5) == pytest.approx(2.5**0.8 * 5**0.2)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_knn(k):
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(57, 16)).astype(np.float32)
    sample = (0.7 + 1.3 * rng.normal(size=(75, 16))).astype(np.float32)
    precision, recall = precision_recall(ref, sample, k=k, batch_size=16, distances="float32")
    expected = brute_force_pr(ref, sample, k)
    assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision_recall(ref, ref, k=k, batch_size=10, distances="float32") == (1.0, 1.0)


def adm_distance_block(u, v):
    """ADM's DistanceBlock (guided-diffusion evaluations/evaluator.py) transcribed to numpy:
    the TF graph on float16 casts, each op's result in float16 (numpy's float16 arithmetic),
    the matmul accumulated in float32 as TF's GPU kernel does, the float32 graph as fallback."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = np.square(u16).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
    norm_v = np.square(v16).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
    matmul = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    d = np.maximum(norm_u - np.float16(2) * matmul + norm_v, np.float16(0))
    if not np.isfinite(d).all():
        d = np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)
    return d.astype(np.float32)


def adm_precision_recall(ref, sample, k=3):
    """ADM's ManifoldEstimator.manifold_radii (the k-th entry of each partitioned distance row,
    the row's own zero included) and evaluate_pr, in one block each."""
    radii_ref = np.partition(adm_distance_block(ref, ref), k, axis=1)[:, k]
    radii_sample = np.partition(adm_distance_block(sample, sample), k, axis=1)[:, k]
    d = adm_distance_block(ref, sample)
    ref_inside = (d <= radii_sample[None, :]).any(axis=1)
    sample_inside = (d <= radii_ref[:, None]).any(axis=0)
    return sample_inside.mean(), ref_inside.mean()


def inception_like(rng, n):
    """Non-negative 2048-d features of Inception pool_3's scale (post-ReLU averages)."""
    return (np.abs(rng.normal(0.3, 0.35, size=(n, 2048))) * rng.gamma(2, 0.5, (n, 1))).astype(
        np.float32
    )


def test_precision_recall_matches_adm_evaluators_float16_distances():
    """The default equals ADM's evaluator on the same activations; the exact float32 variant
    differs from it by more than the tolerance, so the test tells the two apart."""
    rng = np.random.default_rng(7)
    ref, sample = inception_like(rng, 1500), inception_like(rng, 2000) * 1.05
    adm = np.array(adm_precision_recall(ref, sample))
    ours = np.array(precision_recall(ref, sample, batch_size=600))
    exact = np.array(precision_recall(ref, sample, batch_size=600, distances="float32"))
    assert np.abs(ours - adm).max() <= 1e-3, (ours, adm)
    assert np.abs(exact - adm).max() > 2e-3, (exact, adm)


# ---------------------------------------------------------------- reference files and evaluate


def test_reference_round_trip_and_evaluate_match_direct_computation(extractor, images, tmp_path):
    samples, ref_images = images
    recorder = Recorder(extractor)
    path = tmp_path / "ref.npz"
    written = write_reference(
        batches_of(ref_images, REF_BATCHES), path, recorder, keep_images=KEEP, progress=False
    )
    ref_f = recorder.take()
    ref = load_reference(path)
    with np.load(path) as data:
        layout = {key: (data[key].shape, data[key].dtype) for key in data.files}
    assert layout == {
        "mu": ((2048,), np.float64),
        "sigma": ((2048, 2048), np.float64),
        "mu_s": ((2023,), np.float64),
        "sigma_s": ((2023, 2023), np.float64),
        "arr_0": ((KEEP, 40, 48, 3), np.uint8),
    }
    assert ref.num_images == written.num_images == KEEP
    np.testing.assert_array_equal(np.concatenate(list(ref.image_batches(6))), ref_images[:KEEP])
    np.testing.assert_allclose(ref.mu, ref_f["pool"].mean(0), rtol=1e-10)
    np.testing.assert_allclose(ref.sigma, np.cov(ref_f["pool"], rowvar=False), atol=1e-12)
    np.testing.assert_allclose(ref.mu_s, ref_f["spatial"].mean(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ref.sigma_s, np.cov(ref_f["spatial"], rowvar=False), atol=1e-12)

    result = evaluate(
        batches_of(samples, SAMPLE_BATCHES), path, recorder, progress=False, batch_size=7
    )
    seen = recorder.take()
    sample_f = {key: value[:N_SAMPLES] for key, value in seen.items()}
    ref_pool = seen["pool"][N_SAMPLES:]  # the reference's arr_0, streamed in batches of 7
    np.testing.assert_allclose(ref_pool, ref_f["pool"][:KEEP], rtol=1e-4, atol=1e-5)
    fid = low_rank_fid(sample_f["pool"], ref_f["pool"])
    sfid = low_rank_fid(sample_f["spatial"], ref_f["spatial"])
    precision, recall = adm_precision_recall(ref_pool, sample_f["pool"], k=3)
    expected_is = brute_force_is(softmax(sample_f["logits"], axis=1), 5000)
    assert result == {
        "num_samples": N_SAMPLES,
        "fid": pytest.approx(fid, rel=1e-5),
        "sfid": pytest.approx(sfid, rel=1e-5),
        "inception_score": pytest.approx(expected_is, rel=1e-6),
        "precision": pytest.approx(precision, abs=1e-12),
        "recall": pytest.approx(recall, abs=1e-12),
        "pr_distances": "float16",
    }
    assert fid > 1 and sfid > 1 and expected_is > 1.2  # the features really differ


def test_reference_without_images_or_spatial_stats(extractor, images, tmp_path, monkeypatch):
    """Only FID is computed (sFID, precision and recall are None), from the samples' moments.

    A spy stands in for frechet_distance (tested above) to skip a 2048-d matrix square root."""
    calls = []

    def spy(*stats):
        calls.append(stats)
        return 12.5

    monkeypatch.setattr("metrics.evaluation.frechet_distance", spy)
    path = tmp_path / "mu_sigma_only.npz"
    rng = np.random.default_rng(7)
    np.savez(path, mu=rng.normal(size=2048), sigma=np.eye(2048))
    ref = load_reference(path)
    assert ref.mu_s is None and ref.sigma_s is None and ref.num_images == 0
    recorder = Recorder(extractor)
    samples = images[0][:5]
    result = evaluate([samples[:2], samples[2:]], ref, recorder, progress=False)
    pool = recorder.take()["pool"]
    assert result["fid"] == 12.5 and len(calls) == 1
    mu, sigma, ref_mu, ref_sigma = calls[0]
    np.testing.assert_allclose(mu, pool.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(pool, rowvar=False), atol=1e-14)
    assert ref_mu is ref.mu and ref_sigma is ref.sigma
    assert result["sfid"] is None and result["precision"] is None and result["recall"] is None
    assert result["num_samples"] == 5


def test_write_reference_is_atomic(extractor, images, tmp_path, monkeypatch):
    """A failure while extracting or while writing leaves the previous file as it was."""
    path = tmp_path / "ref.npz"
    good = images[0][:2]
    previous = write_reference([good], path, extractor, keep_images=0, progress=False)
    assert previous.num_images == 0  # keep_images=0 writes no arr_0
    content = path.read_bytes()
    with pytest.raises(MetricsError):
        write_reference([good, good.astype(np.float32)], path, extractor, progress=False)
    assert path.read_bytes() == content

    def crash(out, arrays, images):
        out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("metrics.reference.write_npz", crash)
    with pytest.raises(OSError, match="disk full"):
        write_reference([good], path, extractor, progress=False)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]


def test_iter_npz_array_streams_plain_and_compressed_members(tmp_path):
    array = np.arange(10 * 4 * 5 * 3, dtype=np.uint8).reshape(10, 4, 5, 3)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, arr_0=array)
        batches = list(iter_npz_array(path, batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), array)


# ---------------------------------------------------------------- bad input


def _reference_without_mu(path):
    np.savez(path, sigma=np.eye(2048))


def _reference_with_wrong_shapes(path):
    np.savez(path, mu=np.zeros(10), sigma=np.eye(10))


def _reference_with_float_images(path):
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros((2, 8, 8, 3)))


def _not_an_npz(path):
    path.write_bytes(b"not a zip file")


def _empty_file(path):
    path.write_bytes(b"")


def _pickled_statistics(path):
    np.savez(path, mu=np.array([{}], dtype=object), sigma=np.eye(2048))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_reference_without_mu, ["no 'mu'", "VIRTUAL_imagenet256_labeled.npz"]),
        (_reference_with_wrong_shapes, ["mu", "(10,)", "(2048,)"]),
        (_reference_with_float_images, ["arr_0", "uint8"]),
        (_not_an_npz, ["not an .npz", "--make-ref"]),
        (_empty_file, ["not an .npz"]),
        (_pickled_statistics, ["mu is a pickled object array, which is never loaded"]),
        (None, ["does not exist", "evaluate_fid.py --make-ref OUT.npz"]),
    ],
)
def test_bad_reference_files(tmp_path, make, words):
    """One line naming the fix a user runs (--make-ref, not the function behind it), never
    numpy's advice to load the file unsafely."""
    path = tmp_path / "ref.npz"
    if make is not None:
        make(path)
    with pytest.raises(MetricsError) as excinfo:
        load_reference(path)
    assert_one_line_error(excinfo, *words)
    assert "allow_pickle" not in str(excinfo.value) and "write_reference" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        (np.zeros((2, 16, 16, 3), np.float32), ["float32", "uint8"]),
        (torch.zeros((2, 16, 16, 3)), ["float32", "uint8"]),
        (np.zeros((2, 3, 16, 16), np.uint8), ["(2, 3, 16, 16)", "NHWC"]),
        (np.zeros((16, 16, 3), np.uint8), ["(16, 16, 3)", "(N, H, W, 3)"]),
    ],
)
def test_bad_sample_batches(extractor, batch, words):
    with pytest.raises(MetricsError) as excinfo:
        extractor(batch)
    assert_one_line_error(excinfo, *words)


def test_missing_or_invalid_weights(tmp_path):
    with pytest.raises(MetricsError) as excinfo:
        InceptionFeatures(weights_path=tmp_path / "missing.pth")
    assert_one_line_error(excinfo, "does not exist", "--inception-weights PATH", WEIGHTS_FILE)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(MetricsError) as excinfo:
        InceptionFeatures(weights_path=garbage)
    assert_one_line_error(excinfo, "not a PyTorch state dict", "--inception-weights PATH")
    assert "False" not in str(excinfo.value)  # torch's advice to load it with weights_only=False
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(MetricsError) as excinfo:
        InceptionFeatures(weights_path=wrong)
    assert_one_line_error(excinfo, "not the torch-fidelity Inception", WEIGHTS_FILE)


def test_offline_download_failure_names_the_flag(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MetricsError) as excinfo:
        InceptionFeatures()
    assert_one_line_error(excinfo, "could not download", "--inception-weights PATH", WEIGHTS_FILE)


def test_downloaded_weights_are_checked_before_torch_fidelity_loads_them(
    monkeypatch, tmp_path, weights_file
):
    """Without --inception-weights the weights are torch.hub's cached copy, downloaded there
    first if missing, and checked as a user's file is: a pickle payload in the download never
    runs (torch-fidelity itself would load it with weights_only=False); a good cached copy is
    used without downloading again."""
    from test_crash import Payload

    marker = tmp_path / "payload-ran"
    downloads = []

    def download(url, destination, *args, **kwargs):
        downloads.append(url)
        torch.save({"fc.weight": Payload(marker)}, destination)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    with pytest.raises(MetricsError) as excinfo:
        InceptionFeatures()
    assert_one_line_error(excinfo, "not a PyTorch state dict", "--inception-weights PATH")
    assert "False" not in str(excinfo.value)  # torch's advice to load it with weights_only=False
    assert downloads == [WEIGHTS_URL] and not marker.exists()
    cached = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    shutil.copyfile(weights_file, cached)
    assert isinstance(InceptionFeatures(), InceptionFeatures)
    assert downloads == [WEIGHTS_URL]
