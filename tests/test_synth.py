"""deblur_lib.synth: dead leaves, the endless SyntheticPairs dataset (determinism, ranges,
DataLoader workers), the held-out test photos, and the on-disk synthesize()."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deblur_lib import data, synth
from deblur_lib.data import PairedImageFolder, load_image
from deblur_lib.degrade import DegradeParams, convolve_valid, decode_u8, encode_u8
from deblur_lib.synth import (
    DEAD_LEAVES,
    GENERATOR_VERSION,
    TEST_SOURCES,
    TRAIN_SOURCES,
    SyntheticPairs,
    dead_leaves,
    synthesize,
)

CLEAN = DegradeParams(
    varying_share=0.0, highlight_share=0.0, shot_noise=(0, 0), read_noise=(0, 0), jpeg_share=0.0
)


def _u8(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _sha(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_data_reexports_synthesize() -> None:
    assert data.synthesize is synth.synthesize
    assert GENERATOR_VERSION == 1


# --- dead leaves ------------------------------------------------------------------------------


def test_leaves_when_every_leaf_is_large() -> None:
    """Seed 4 at 64 px draws only leaves too large for the batched small-leaf path (this
    crashed a training run's DataLoader with a zip() length error)."""
    label = synth._leaves(64, np.random.default_rng(4), coverage=0.3)[1]
    assert label.shape == (64, 64) and label.max() > 0


@pytest.mark.parametrize("size", [40, 158])
def test_dead_leaves_is_a_colored_occluding_scene(size: int) -> None:
    image = dead_leaves(size, np.random.default_rng(size))
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert np.array_equal(image, dead_leaves(size, np.random.default_rng(size)))
    assert not np.array_equal(image, dead_leaves(size, np.random.default_rng(size + 1)))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_leaves_cover_the_layer_with_many_occluding_leaves() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, label = synth._leaves(120, rng, coverage=3.0)
        assert image.shape == (120, 120, 3) and image.dtype == np.float32
        assert image.min() >= 0 and image.max() <= 1
        assert label.dtype == np.int32 and len(np.unique(label)) > 10
        assert (label == 0).mean() < 0.3  # the background shows only through gaps


def test_dead_leaves_colors_are_not_gray() -> None:
    rng = np.random.default_rng(1)
    chroma = [dead_leaves(64, rng).astype(float).std(axis=2).mean() for _ in range(8)]
    assert np.mean(chroma) > 5


# --- SyntheticPairs -------------------------------------------------------------------------


def test_pairs_are_a_pure_function_of_seed_and_index() -> None:
    a, b = SyntheticPairs(48, length=4, seed=3), SyntheticPairs(48, length=4, seed=3)
    for i in (0, 1, 10**12):  # any index, not only i < len(ds)
        x, y = a[i], b[i]
        assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
    assert not torch.equal(a[0][0], a[1][0]) and not torch.equal(a[0][1], a[1][1])
    other = SyntheticPairs(48, length=4, seed=4)
    assert not torch.equal(a[0][1], other[0][1])
    assert len(a) == 4 and len(list(a)) == 4  # iteration ends after len(ds)


def test_pairs_are_model_space_tensors_of_the_uint8_images() -> None:
    ds = SyntheticPairs(40, length=8, seed=0)
    for i in range(6):
        blur, sharp = ds[i]
        pair = ds.pair(i)
        for t, img in ((blur, pair.blur), (sharp, pair.sharp)):
            assert t.dtype == torch.float32 and t.shape == (3, 40, 40)
            assert t.min() >= -1 and t.max() <= 1
            expected = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
            assert torch.equal(t, expected)
        assert pair.kernel.dtype == np.float32 and abs(float(pair.kernel.sum()) - 1) < 1e-5
        assert pair.kernel.shape[0] % 2 == 1 and 7 <= pair.kernel.shape[0] <= 19  # cap: 40 // 2


def test_natural_share_chooses_between_photos_and_dead_leaves() -> None:
    leaves = SyntheticPairs(64, natural_share=0.0)
    photos = SyntheticPairs(64, natural_share=1.0)
    assert {leaves.pair(i).source for i in range(6)} == {DEAD_LEAVES}
    used = {photos.pair(i).source for i in range(12)}
    assert used <= set(TRAIN_SOURCES) and len(used) > 3


def test_training_sources_never_include_test_photos() -> None:
    assert not set(TRAIN_SOURCES) & set(TEST_SOURCES)
    assert SyntheticPairs().sources == TRAIN_SOURCES
    assert {SyntheticPairs(64, natural_share=1.0).pair(i).source for i in range(20)}.isdisjoint(
        TEST_SOURCES
    )


def test_test_photos_allow_many_256px_crops() -> None:
    """Every test photo holds a 256 px crop plus the widest kernel's padding, at varying
    positions and scales: 50 test crops are 50 different images."""
    min_side = 256 + DegradeParams().kernel_size[1] - 1
    assert synth._usable(TEST_SOURCES, min_side) == TEST_SOURCES
    names = TEST_SOURCES * 9
    crops = [
        synth._photo_crop(synth._photo(n), min_side, np.random.default_rng(i))
        for i, n in enumerate(names)
    ]
    assert len({hashlib.sha256(c.tobytes()).hexdigest() for c in crops}) == 54


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_size": 16}, "crop_size"),
        ({"crop_size": 64.0}, "crop_size"),
        ({"length": 0}, "length"),
        ({"seed": -1}, "seed"),
        ({"natural_share": 1.5}, "natural_share"),
        ({"natural_share": "0.5"}, "natural_share"),
        ({"sources": "skimage.data.camera"}, "tuple of photo names"),
        ({"sources": ("skimage.data.nope",)}, "unknown source"),
        ({"params": {"jpeg_share": 0.0}}, "DegradeParams"),
        ({"crop_size": 4096}, "no installed photo"),
        ({"sources": ()}, "no installed photo"),
    ],
)
def test_synthetic_pairs_reject_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticPairs(**kwargs)


def test_synthetic_pairs_without_photos_need_no_sources() -> None:
    ds = SyntheticPairs(4096 // 64, sources=(), natural_share=0.0)
    assert ds.pair(0).source == DEAD_LEAVES


@pytest.mark.parametrize("index", [-1, 1.5, True, "3"])
def test_synthetic_pairs_reject_bad_indices(index: object) -> None:
    with pytest.raises(ValueError, match="index"):
        SyntheticPairs(32)[index]


def test_synthetic_pairs_work_in_dataloader_workers() -> None:
    ds = SyntheticPairs(32, length=6, seed=2, params=replace(CLEAN, jpeg_share=0.5))
    assert len(pickle.dumps(ds)) < 2000  # no decoded photos travel to the workers
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    blurs = torch.cat([b for b, _ in loader])
    sharps = torch.cat([s for _, s in loader])
    assert blurs.shape == (6, 3, 32, 32)
    for i in range(6):
        assert torch.equal(blurs[i], ds[i][0]) and torch.equal(sharps[i], ds[i][1])


# --- synthesize -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, n_train=4, n_test=2, size=64, seed=0, progress=False)
    return out


def test_synthesize_layout_and_manifest(synth_dir: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for sub, ext in (("blur", "png"), ("sharp", "png"), ("kernels", "npy")):
            names = sorted(p.name for p in (synth_dir / split / sub).iterdir())
            assert names == [f"{i:04d}.{ext}" for i in range(n)]
        ds = PairedImageFolder(synth_dir / split)
        assert len(ds) == n and ds.validate(full=True) == n
        assert ds[0][0].shape == (3, 64, 64)
    m = json.loads((synth_dir / "manifest.json").read_text())
    assert m["complete"] and m["counts"] == {"train": 4, "test": 2}
    settings = m["settings"]
    assert settings["size"] == 64 and settings["seed"] == 0 and settings["format"] == 2
    assert settings["generator_version"] == GENERATOR_VERSION
    assert settings["degrade"] == DegradeParams().to_dict()
    assert m["sources"]["test"] == list(TEST_SOURCES)
    assert not set(m["sources"]["train"]) & set(m["sources"]["test"])  # held-out photos
    assert set(m["used"]["test"]) <= set(TEST_SOURCES)
    assert sum(m["used"]["train"].values()) == 4


def test_synthesize_train_split_is_the_endless_stream(synth_dir: Path) -> None:
    ds = SyntheticPairs(64, seed=0)
    for i in range(4):
        pair = ds.pair(i)
        assert np.array_equal(
            load_image(synth_dir / "train" / "sharp" / f"{i:04d}.png"),
            pair.sharp.astype(np.float32) / 255,
        )
        assert np.array_equal(
            np.load(synth_dir / "train" / "kernels" / f"{i:04d}.npy"), pair.kernel
        )


def test_synthesize_blur_is_the_saved_kernel_in_linear_light(tmp_path: Path) -> None:
    """Without noise, JPEG and highlights, the blurred image is the saved kernel's convolution
    of the sharp image in linear light (inside the border, where the scene is known)."""
    synthesize(tmp_path, 3, 3, size=64, seed=0, params=CLEAN, progress=False)
    for split in ("train", "test"):
        for i in range(3):
            k = np.load(tmp_path / split / "kernels" / f"{i:04d}.npy")
            sharp, blur = (
                _u8(tmp_path / split / sub / f"{i:04d}.png") for sub in ("sharp", "blur")
            )
            r = k.shape[0] // 2
            ref = encode_u8(convolve_valid(decode_u8(sharp), k[None])[0])
            diff = np.abs(blur[r:-r, r:-r].astype(int) - ref.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.05


def test_synthesize_default_kernel_explains_the_blur(synth_dir: Path) -> None:
    """With noise, JPEG and highlights on, the saved kernel still explains the blurred image
    far better than no blur or the point-mirrored kernel (the PSF's orientation)."""
    errors = {"kernel": 0.0, "none": 0.0, "mirrored": 0.0}
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            k = np.load(synth_dir / split / "kernels" / f"{i:04d}.npy")
            sharp, blur = (
                _u8(synth_dir / split / sub / f"{i:04d}.png") for sub in ("sharp", "blur")
            )
            r = k.shape[0] // 2
            inner = blur[r:-r, r:-r].astype(float)
            for name, kern in (("kernel", k), ("mirrored", k[::-1, ::-1])):
                ref = encode_u8(convolve_valid(decode_u8(sharp), kern[None].copy())[0])
                errors[name] += float(np.mean((inner - ref) ** 2))
            errors["none"] += float(np.mean((inner - sharp[r:-r, r:-r]) ** 2))
    assert errors["kernel"] < 0.5 * errors["none"] and errors["kernel"] < errors["mirrored"]


def test_synthesize_same_seed_is_byte_identical(synth_dir: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "again", 4, 2, size=64, seed=0, progress=False)
    synthesize(tmp_path / "other", 4, 2, size=64, seed=1, progress=False)
    synthesize(tmp_path / "fewer", 2, 1, size=64, seed=0, progress=False)
    reference, again = _sha(synth_dir), _sha(tmp_path / "again")
    assert again == reference
    other = _sha(tmp_path / "other")
    assert all(other[n] != reference[n] for n in reference if n.endswith(".png"))
    fewer = _sha(tmp_path / "fewer")  # image i depends only on (seed, split, i)
    assert all(fewer[n] == reference[n] for n in fewer if n != "manifest.json")


def test_synthesize_is_idempotent_and_refuses_foreign_content(tmp_path: Path) -> None:
    out = tmp_path / "d"
    first = synthesize(out, 2, 1, size=32, seed=0, progress=False)
    stamp = (out / "train" / "blur" / "0000.png").stat().st_mtime_ns
    assert synthesize(out, 2, 1, size=32, seed=0, progress=False) == first
    assert (out / "train" / "blur" / "0000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthesize(out, 3, 1, size=32, seed=0, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # other degradation params
        synthesize(out, 2, 1, size=32, seed=0, params=CLEAN, progress=False)
    (out / "train" / "blur" / "0001.png").unlink()  # incomplete: regenerated, no overwrite
    assert synthesize(out, 2, 1, size=32, seed=0, progress=False) == first
    assert (out / "train" / "blur" / "0001.png").exists()
    (out / "keep.txt").write_text("user file")
    m = synthesize(out, 3, 1, size=32, seed=0, overwrite=True, progress=False)
    assert m["counts"]["train"] == 3 and (out / "keep.txt").exists()
    assert len(list((out / "train" / "sharp").iterdir())) == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        synthesize(foreign, 1, 1, size=32, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_test": 0},
        {"size": 31},
        {"size": 64.0},
        {"n_train": True},
        {"seed": -1},
        {"params": None},
        {"size": 4096},
    ],
)
def test_synthesize_rejects_bad_values(tmp_path: Path, kwargs: dict) -> None:
    args = {"n_train": 1, "n_test": 1, "size": 32} | kwargs
    match = "too large" if kwargs.get("size") == 4096 else next(iter(kwargs))
    with pytest.raises(ValueError, match=match):
        synthesize(tmp_path / "d", **args)
    assert not (tmp_path / "d").exists()
