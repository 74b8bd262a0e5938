"""Datasets and the latent cache: ADM's crop on made-up images, image folders written here,
the synthetic shapes (determinism, learnable classes), and the cache against direct encoding."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from data import (
    DataError,
    ImageFolderDataset,
    LatentCacheDataset,
    SyntheticShapes,
    build_dataset,
    build_latent_cache,
    center_crop_arr,
    synthetic_spec,
)
from data.synthetic import COLOURS, SHAPES, class_style
from models.codec import PixelCodec, VAECodec

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(width, height, cuts, axis):
    """Red / green / blue bands split at `cuts` along x (axis=1) or y (axis=0)."""
    arr = np.zeros((height, width, 3), np.uint8)
    edges = [0, *cuts, arr.shape[axis]]
    for colour, lo, hi in zip((RED, GREEN, BLUE), edges[:-1], edges[1:], strict=True):
        arr[(slice(None), slice(lo, hi)) if axis == 1 else slice(lo, hi)] = colour
    return Image.fromarray(arr)


# ---------------------------------------------------------------- centre crop


@pytest.mark.parametrize(
    "width, height, cuts, axis, size",
    [
        # 200x100 -> box 100x50 -> bicubic 64x32 -> columns 16..48, i.e. source columns 50..150
        (200, 100, (50, 150), 1, 32),
        # 90x300 -> box 45x150 -> bicubic 30x100 -> rows 35..65, i.e. source rows 105..195
        (90, 300, (105, 195), 0, 30),
    ],
)
def test_center_crop_keeps_the_middle_band(width, height, cuts, axis, size):
    out = center_crop_arr(bands(width, height, cuts, axis), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    inner = out[:, 3:-3] if axis == 1 else out[3:-3]
    assert (inner[..., 1] >= 250).all() and (inner[..., [0, 2]] <= 5).all()
    edge = out[:, 0] if axis == 1 else out[0]
    assert edge[..., 0].mean() > 5  # the red band starts right at the crop edge


def test_center_crop_box_halves_exact_multiples():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 32)
    blocks = arr.reshape(32, 4, 32, 4, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out - blocks).max() <= 2.0  # two 2x2 box halvings; PIL rounds each up <= 1
    bicubic = np.asarray(Image.fromarray(arr).resize((32, 32), Image.BICUBIC))
    assert np.abs(bicubic - blocks).max() > 2.0  # so the check tells the two paths apart
    assert np.array_equal(center_crop_arr(Image.fromarray(arr), 128), arr)


# ---------------------------------------------------------------- image folders


def write_png(path, colour, size=(24, 20)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")


@pytest.fixture
def folder(tmp_path):
    write_png(tmp_path / "b_cat" / "1.png", RED)
    write_png(tmp_path / "b_cat" / "deep" / "2.PNG", GREEN)
    write_png(tmp_path / "a_dog" / "x.png", BLUE)
    write_png(tmp_path / ".hidden" / "y.png", RED)
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_labels_follow_sorted_class_names(folder):
    ds = ImageFolderDataset(str(folder), 16)
    assert ds.classes == ["a_dog", "b_cat"] and ds.num_classes == 2 and len(ds) == 3
    got = [(label, tuple(img[:, 8, 8].tolist())) for img, label in ds]
    assert got == [(0, (-1.0, -1.0, 1.0)), (1, (1.0, -1.0, -1.0)), (1, (-1.0, 1.0, -1.0))]
    image = ds[0][0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32


def test_unreadable_images_fail_with_their_path(folder):
    (folder / "a_dog" / "junk.jpg").write_bytes(b"this is not a jpeg")
    truncated = folder / "b_cat" / "3.png"
    write_png(truncated, RED, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    ds = ImageFolderDataset(str(folder), 16)
    bad = [i for i, (path, _) in enumerate(ds.samples) if path.endswith(("junk.jpg", "3.png"))]
    for i in bad:
        with pytest.raises(DataError, match=os.path.basename(ds.samples[i][0])):
            ds[i]
    with pytest.raises(DataError) as err:
        ds.verify(workers=2)
    message = str(err.value)
    assert "\n" not in message and message.startswith("2 unreadable")
    assert str(folder / "a_dog" / "junk.jpg") in message and str(truncated) in message


def test_missing_or_empty_folders_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 16)
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(str(tmp_path), 16)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="has no images"):
        ImageFolderDataset(str(tmp_path), 16)


def test_build_dataset(folder):
    synthetic = build_dataset("synthetic:50", 16)
    assert isinstance(synthetic, SyntheticShapes) and len(synthetic) == 50
    assert synthetic.num_classes == 10 and build_dataset("synthetic", 16, 4).num_classes == 4
    with pytest.raises(DataError, match="synthetic:N"):
        build_dataset("synthetic:lots", 16)
    assert synthetic_spec("synthetic-shape:30") == (30, True)
    assert synthetic_spec("synthetic") == (10000, False) and synthetic_spec("/data/x") is None
    with pytest.raises(DataError, match="synthetic-shape:N"):
        synthetic_spec("synthetic-shape:")
    with pytest.raises(DataError, match="train_classifier.py"):
        build_dataset("synthetic-shape:50", 16)
    assert build_dataset(str(folder), 16, num_classes=5).num_classes == 2
    with pytest.raises(DataError, match="2 class folders"):
        build_dataset(str(folder), 16, num_classes=1)


# ---------------------------------------------------------------- synthetic shapes


def test_synthetic_images_are_pure_functions_of_seed_and_index():
    a, b = SyntheticShapes(32), SyntheticShapes(32)
    assert torch.equal(a[7][0], b[7][0])
    assert not torch.equal(a[7][0], SyntheticShapes(32, seed=1)[7][0])
    assert not torch.equal(a[7][0], a[17][0])  # same class, different jitter
    for i in range(20):
        image, label = a[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1 and label == i % 10
    assert SyntheticShapes(16, num_classes=3)[5][1] == 2
    with pytest.raises(IndexError):
        a[len(a)]


def test_synthetic_scene_is_the_same_at_every_resolution():
    small, large = SyntheticShapes(16), SyntheticShapes(64)
    pooled = [torch.nn.functional.avg_pool2d(large[i][0][None], 4)[0] for i in (3, 13)]
    same = (small[3][0] - pooled[0]).abs().mean()
    other = (small[3][0] - pooled[1]).abs().mean()  # same class, another scene
    assert same < 0.05 and other > 3 * same


def test_synthetic_classes_are_learnable_by_nearest_class_mean():
    ds = SyntheticShapes(16)
    train = torch.stack([ds[i][0] for i in range(200)]).flatten(1)
    test = torch.stack([ds[i][0] for i in range(200, 400)]).flatten(1)
    labels = torch.arange(200) % 10
    means = torch.stack([train[labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(test, means).argmin(1) == labels).float().mean()
    assert accuracy > 0.9


def test_synthetic_classes_are_distinct_shape_colour_pairs():
    styles = [class_style(c) for c in range(100)]
    assert len(set(styles)) == 100
    assert len({s for s, _ in styles[:10]}) == 10 and len({c for _, c in styles[:10]}) == 10
    with pytest.raises(DataError):
        SyntheticShapes(16, num_classes=101)


def brightest_colour(image: np.ndarray) -> str:
    """The palette colour nearest in hue to an image's brightest pixel (inside the shape)."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], float)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    pixels = image.reshape(-1, 3).astype(float)
    pixel = pixels[pixels.sum(1).argmax()]
    return names[int((palette @ (pixel / np.linalg.norm(pixel))).argmax())]


def test_shape_only_classes_draw_each_shape_in_random_colours():
    """Control: with shape x colour classes the brightest pixel names the class colour; with
    shape-only classes every class shows most colours, so colour does not give the class away,
    while the scene (background, place, size, angle) is the same as the shape x colour render."""
    paired, shaped = SyntheticShapes(32, 10, 400), SyntheticShapes(32, 10, 400, shape_only=True)
    paired_colours = [brightest_colour(paired.render(i, i % 10)) for i in range(400)]
    assert np.mean([c == class_style(i % 10)[1] for i, c in enumerate(paired_colours)]) > 0.95
    colours = [brightest_colour(shaped.render(i, i % 10)) for i in range(400)]
    assert all(len(set(colours[c::10])) >= 7 for c in range(10))
    assert np.mean([c == class_style(i % 10)[1] for i, c in enumerate(colours)]) < 0.3
    assert shaped.classes == list(SHAPES) and shaped[13][1] == 3
    a, b = paired.render(7, 7).astype(int), shaped.render(7, 7).astype(int)
    assert (a[0, 0] == b[0, 0]).all() and (a[-1, -1] == b[-1, -1]).all()  # same background
    with pytest.raises(DataError, match="1..10 classes"):
        SyntheticShapes(16, num_classes=11, shape_only=True)


# ---------------------------------------------------------------- latent cache


class Counting:
    """A codec wrapper that counts encoder calls, to see what a re-run recomputes."""

    def __init__(self, codec):
        self.codec, self.calls = codec, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def posterior(self, images):
        self.calls += 1
        return self.codec.posterior(images)


def tiny_vae_codec():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    return VAECodec(vae, "tiny")


@pytest.mark.parametrize("codec", [PixelCodec(), tiny_vae_codec()], ids=["pixels", "vae"])
def test_cache_matches_direct_posteriors_of_image_and_mirror(tmp_path, codec):
    ds = SyntheticShapes(16, length=7)
    build_latent_cache(ds, codec, str(tmp_path), batch_size=3, progress=False, shard_size=4)
    cache = LatentCacheDataset(str(tmp_path))
    assert len(cache) == 7 and cache.num_classes == 10
    images = torch.stack([ds[i][0] for i in range(7)])
    for flip, batch in enumerate([images, images.flip(-1)]):
        mean, std = codec.posterior(batch)
        for i in range(7):
            got_mean, got_std, label = cache[i]
            assert got_mean.shape == (2, *mean.shape[1:]) and got_mean.dtype == torch.float32
            torch.testing.assert_close(got_mean[flip], mean[i], atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(got_std[flip], std[i], atol=2e-3, rtol=1e-3)
            assert label == i % 10
    if isinstance(codec, PixelCodec):
        assert torch.equal(cache[2][1], torch.zeros(2, 3, 16, 16))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["latent_shape"] == list(mean.shape[1:]) and meta["codec"] == codec.spec


def test_two_ranks_write_disjoint_shards_merged_in_index_order(tmp_path):
    ds, out = SyntheticShapes(8, length=11), str(tmp_path)
    build_latent_cache(ds, PixelCodec(), out, rank=0, world_size=2, batch_size=2, progress=False)
    rank0 = set(os.listdir(out)) - {"meta.json"}
    with pytest.raises(DataError, match="incomplete: 5 of 11 images missing"):
        LatentCacheDataset(out)  # rank 0 holds the even indices only
    mine, theirs = (
        ".shard-001-of-002-00000.npy.0123456789ab.tmp",
        ".shard-000-of-002-00001.npy.ba9876543210.tmp",
    )
    for leftover in (mine, theirs):  # a killed write of each rank's
        (tmp_path / leftover).write_bytes(b"half")
    build_latent_cache(ds, PixelCodec(), out, rank=1, world_size=2, batch_size=2, progress=False)
    assert not (tmp_path / mine).exists() and (tmp_path / theirs).exists()  # its own only
    (tmp_path / theirs).unlink()
    rank1 = set(os.listdir(out)) - {"meta.json"} - rank0
    assert rank0 and rank1 and all("-000-of-002-" in f for f in rank0)
    assert all("-001-of-002-" in f for f in rank1)
    odd = {int(i) for f in rank1 for i in np.load(os.path.join(out, f))["index"]}
    assert odd == set(range(1, 11, 2))
    cache = LatentCacheDataset(out)
    for i in range(11):
        mean, _, label = cache[i]
        torch.testing.assert_close(mean[0], ds[i][0], atol=1e-3, rtol=0)
        assert label == i % 10


def test_rerun_skips_complete_shards_and_redoes_missing_ones(tmp_path):
    ds, out = SyntheticShapes(8, length=10), str(tmp_path)
    opts = {"batch_size": 2, "progress": False, "shard_size": 4}
    build_latent_cache(ds, PixelCodec(), out, **opts)
    shards = sorted(f for f in os.listdir(out) if f.startswith("shard-"))
    assert len(shards) == 3  # 4 + 4 + 2 images
    codec = Counting(PixelCodec())
    build_latent_cache(ds, codec, out, **opts)
    assert codec.calls == 0
    os.remove(os.path.join(out, shards[1]))
    with pytest.raises(DataError, match="incomplete: 4 of 10"):
        LatentCacheDataset(out)
    build_latent_cache(ds, codec, out, **opts)
    assert codec.calls == 2  # the one missing shard: two batches of two
    torch.testing.assert_close(
        LatentCacheDataset(out)[5][0][1], ds[5][0].flip(-1), atol=1e-3, rtol=0
    )


def test_cache_refuses_a_different_codec_or_a_missing_build(tmp_path):
    ds = SyntheticShapes(16, length=2)
    with pytest.raises(DataError, match="meta.json missing"):
        LatentCacheDataset(str(tmp_path))
    build_latent_cache(ds, PixelCodec(), str(tmp_path), progress=False)
    with pytest.raises(DataError, match="codec='none'"):
        build_latent_cache(ds, tiny_vae_codec(), str(tmp_path), progress=False)
