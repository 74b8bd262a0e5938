"""The demo's offline evaluator: a classifier trained on the synthetic shapes, its cache, and the
accuracy / Fréchet distance it reports for real, noise and mislabelled images."""

import os
import time

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticShapes
from metrics import MetricsError
from metrics import demo_classifier as dc

SIZE = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-cache")
    start = time.perf_counter()
    scorer = dc.load_or_train(SIZE, cache_dir=str(folder))
    return scorer, str(folder), time.perf_counter() - start


@pytest.fixture(scope="module")
def scorer(cache):
    return cache[0]


def batched(images, labels, size=250):
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def independent_fd(a, b):
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), by symmetric eigensolves."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()


def test_classifier_recognises_all_styles_held_out(scorer, cache):
    assert cache[2] < 60, f"training took {cache[2]:.0f} s"
    images, labels = dc.render(SIZE, 1000, seed=7)  # all 100 (shape, colour) styles
    logits, features = scorer(images)
    assert logits.shape == (1000, dc.STYLES)
    assert features.shape == (1000, 128) and features.dtype == np.float64
    assert (logits.argmax(1) == labels).mean() >= 0.95


def test_cache_round_trips_without_retraining(scorer, cache, monkeypatch):
    folder = cache[1]
    assert os.listdir(folder) == [f"shapes-{SIZE}px-100styles-{dc.VERSION}.pt"]  # no temp left
    monkeypatch.setattr(dc, "train", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again = dc.load_or_train(SIZE, cache_dir=folder)
    images, _ = dc.render(SIZE, 50, seed=8)
    np.testing.assert_array_equal(again(images)[0], scorer(images)[0])
    np.testing.assert_array_equal(again(images)[1], scorer(images)[1])


def test_unreadable_cache_is_retrained_and_replaced(tmp_path, monkeypatch):
    calls = []

    def fake_train(image_size):
        calls.append(image_size)
        return dc.DemoClassifier(image_size).eval()

    monkeypatch.setattr(dc, "train", fake_train)
    dc.load_or_train(16, cache_dir=str(tmp_path))  # missing -> trained
    path = tmp_path / f"shapes-16px-100styles-{dc.VERSION}.pt"
    path.write_bytes(b"truncated")
    dc.load_or_train(16, cache_dir=str(tmp_path))  # unreadable -> trained again
    assert calls == [16, 16]
    dc.DemoClassifier(16).load_state_dict(torch.load(path, weights_only=True))
    dc.load_or_train(16, cache_dir=str(tmp_path))  # readable -> loaded
    assert calls == [16, 16] and os.listdir(tmp_path) == [path.name]


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VCA_DIT_CACHE", str(tmp_path))
    assert dc.default_cache_dir() == str(tmp_path / "demo-classifier")
    monkeypatch.delenv("VCA_DIT_CACHE")
    assert dc.default_cache_dir() == os.path.expanduser("~/.cache/vca-dit/demo-classifier")


def test_real_images_score_high_and_match_independent_computation(scorer):
    images, labels = dc.render(SIZE, 1000, num_classes=10, seed=4)
    result = dc.demo_metrics(batched(images, labels), scorer, num_reference=1000, seed=2)

    logits, features = scorer(images)
    real_images, real_labels = dc.render(SIZE, 1000, num_classes=10, seed=2)
    real_logits, real_features = scorer(real_images)
    assert result["num_samples"] == 1000
    assert result["class_accuracy"] == np.mean(np.argmax(logits, axis=1) == labels) >= 0.95
    assert result["real_accuracy"] == np.mean(np.argmax(real_logits, axis=1) == real_labels)
    assert result["real_accuracy"] >= 0.95
    assert result["frechet_distance"] == pytest.approx(
        independent_fd(features, real_features), rel=1e-6, abs=1e-9
    )


def test_noise_and_wrong_labels_score_low(scorer):
    images, labels = dc.render(SIZE, 1000, num_classes=10, seed=5)
    real = dc.demo_metrics(batched(images, labels), scorer, num_reference=1000)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    noisy = dc.demo_metrics(batched(noise, labels), scorer, num_reference=1000)
    shuffled = np.random.default_rng(1).permutation(labels)
    mislabelled = dc.demo_metrics(batched(images, shuffled), scorer, num_reference=1000)

    assert noisy["class_accuracy"] <= 0.2  # chance is 0.1 at best
    assert noisy["frechet_distance"] > 20 * real["frechet_distance"]
    assert mislabelled["class_accuracy"] == pytest.approx(np.mean(shuffled == labels), abs=0.05)
    assert mislabelled["frechet_distance"] == pytest.approx(real["frechet_distance"])


def test_bootstrap_noise_matches_the_binomial_se_and_repeated_draws(scorer):
    """The accuracy's bootstrap SE against the closed form sqrt(p (1 - p) / n); the Frechet
    distance's against its spread over independent sample sets of the same size, drawn as
    evaluate_fid draws them (i.i.d. labels) and shifted by pixel noise so that the distance is
    far from 0, where no resampling estimate of its noise holds."""
    n = 400
    results = []
    for k in range(8):
        rng = np.random.default_rng(k)
        labels = rng.integers(0, 10, n)
        data = SyntheticShapes(SIZE, 10, n, seed=10 + k)
        images = np.stack([data.render(i, c) for i, c in enumerate(labels)])
        images = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
        guessed = np.where(rng.random(n) < 0.5, labels, (labels + 1) % 10)  # about half right
        results.append(dc.demo_metrics(batched(images, guessed), scorer, num_reference=1000))
    first = results[0]
    p = first["class_accuracy"]
    assert 0.35 < p < 0.65
    assert first["class_accuracy_bootstrap_se"] == pytest.approx(np.sqrt(p * (1 - p) / n), rel=0.2)
    spread = np.std([r["frechet_distance"] for r in results], ddof=1)
    se = np.mean([r["frechet_distance_bootstrap_se"] for r in results])
    assert spread / 2 < se < spread * 2


def test_a_right_colour_on_the_wrong_shape_is_not_recognised(scorer):
    """Class 91 is shape 1 (square) in colour 0 (red); a 10-way classifier would call it 0."""
    images, _ = dc.render(SIZE, 200, seed=6)
    red_squares = images[np.arange(200) % 100 == 91]
    result = dc.demo_metrics([(red_squares, np.zeros(len(red_squares), int))], scorer, 100)
    assert result["class_accuracy"] == 0


def test_bad_input_is_refused(scorer):
    images, labels = dc.render(SIZE, 4, num_classes=10)
    with pytest.raises(MetricsError, match="uint8"):
        scorer(images.astype(np.float32))
    with pytest.raises(MetricsError, match="32 px"):
        scorer(dc.render(16, 4)[0])
    with pytest.raises(MetricsError, match="labels"):
        dc.demo_metrics([(images, labels[:3])], scorer)
    with pytest.raises(MetricsError, match="at least 2"):
        dc.demo_metrics([(images[:1], labels[:1])], scorer)
