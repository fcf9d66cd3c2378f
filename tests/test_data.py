"""Tests for deblur_lib.data: decoding, pairing layouts, every DatasetError, aligned
crops/augmentation, seeded loaders and the CLI (the synthetic dataset: tests/test_synth.py)."""

from __future__ import annotations

import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deblur_lib.data import (
    DatasetError,
    GlobalBatchSampler,
    KeyedCrops,
    PairedImageFolder,
    load_image,
    main,
    make_loader,
)

REPO = Path(__file__).resolve().parents[1]


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _pair(root: Path, name: str, blur: np.ndarray, sharp: np.ndarray | None = None) -> None:
    _save(root / "blur" / name, blur)
    _save(root / "sharp" / name, blur if sharp is None else sharp)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by channel count), written by hand."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


# --- load_image ---------------------------------------------------------------------------

# stored pixels = the upright image under the inverse of what EXIF orientation N asks a viewer
# to do, so that applying N gives the upright image back
_STORE_FOR = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _save_oriented(path: Path, upright: np.ndarray, orientation: int) -> Path:
    """``upright`` stored as a phone does: pixels as the sensor read them + an Orientation tag."""
    img, how = Image.fromarray(upright), _STORE_FOR[orientation]
    path.parent.mkdir(parents=True, exist_ok=True)
    (img.transpose(how) if how is not None else img).save(path, exif=_exif(orientation))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_everywhere(tmp_path: Path, orientation: int) -> None:
    """A pair whose blur is stored rotated with an EXIF tag and whose sharp is stored upright:
    the header check, the full check, the loaded pixels and predict's reader all see the
    image upright (before: 5-8 were a false size mismatch, 2-4 silently misaligned pairs)."""
    from deblur_lib.data import image_sizes
    from deblur_lib.predict.__main__ import read_image

    upright = _rgb(20, 30)
    blur = _save_oriented(tmp_path / "blur" / "a.png", upright, orientation)
    _save(tmp_path / "sharp" / "a.png", upright)
    ds = PairedImageFolder(tmp_path)
    assert ds.validate() == 1 and ds.validate(full=True) == 1
    assert image_sizes(ds) == [(20, 30)]
    loaded_blur, loaded_sharp = ds[0]
    assert torch.equal(loaded_blur, loaded_sharp)
    assert np.array_equal(np.asarray(read_image(blur)), upright)
    assert main(["check", str(tmp_path), "--full"]) == 0


def test_exif_orientation_of_a_jpeg(tmp_path: Path) -> None:
    """What a phone writes: a JPEG stored sideways with Orientation 6."""
    upright = np.repeat(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], 32, 0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.repeat(upright, 3, 2)).transpose(Image.Transpose.ROTATE_90).save(
        path, quality=95, exif=_exif(6)
    )
    loaded = load_image(path)
    assert loaded.shape == (32, 48, 3)
    assert np.abs(loaded[..., 0] * 255 - upright[..., 0]).max() < 4  # the ramp runs left-right


def test_load_image_rgb8_exact(tmp_path: Path) -> None:
    a = _rgb(5, 7)
    out = load_image(_save(tmp_path / "x.png", a))
    assert out.dtype == np.float32 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, a.astype(np.float32) / 255)


def test_load_image_jpeg(tmp_path: Path) -> None:
    a = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    out = load_image(_save(tmp_path / "x.jpg", a, quality=95))
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, a / 255, atol=4 / 255)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "P", "P-transparency"])
def test_load_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    gray = np.random.default_rng(1).integers(0, 256, (6, 9), dtype=np.uint8)
    rgb = _rgb(6, 9, 2)
    if mode == "L":
        img, want = Image.fromarray(gray), np.stack([gray] * 3, -1)
    elif mode == "LA":
        img = Image.fromarray(np.stack([gray, 255 - gray], -1), "LA")
        want = np.stack([gray] * 3, -1)
    elif mode == "1":
        img = Image.fromarray(gray > 127)
        want = np.stack([np.where(gray > 127, 255, 0)] * 3, -1)
    elif mode == "RGBA":
        img, want = Image.fromarray(np.dstack([rgb, gray]), "RGBA"), rgb  # alpha is dropped
    else:
        palette = _rgb(1, 256, 3).reshape(-1)
        img = Image.fromarray(gray, "L").convert("P")
        img.putpalette(palette.tolist())
        if mode == "P-transparency":
            img.info["transparency"] = 0
        want = palette.reshape(256, 3)[gray]
    path = tmp_path / "x.png"
    img.save(path)
    out = load_image(path)
    assert out.shape == (6, 9, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, want.astype(np.float32) / 255)


def test_load_image_gray16_keeps_16_bits(tmp_path: Path) -> None:
    g = np.random.default_rng(0).integers(0, 65536, (5, 6), dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    np.testing.assert_allclose(out, np.stack([g] * 3, -1) / 65535, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_load_image_color16_to_8bit_precision(tmp_path: Path, channels: int) -> None:
    a = np.random.default_rng(0).integers(0, 65536, (5, 6, channels), dtype=np.uint16)
    out = load_image(_png16(tmp_path / "c.png", a))
    color = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, -1)
    assert out.shape == (5, 6, 3)
    np.testing.assert_allclose(out, color / 65535, atol=1 / 255)


# --- layouts --------------------------------------------------------------------------------


def test_flat_layout_with_subfolders(tmp_path: Path) -> None:
    _pair(tmp_path, "b/2.png", _rgb(8, 8, 1))
    _pair(tmp_path, "a/1.png", _rgb(8, 8, 2))
    _pair(tmp_path, "0.jpg", _rgb(8, 8, 3))
    _save(tmp_path / "blur" / ".hidden.png", _rgb(8, 8))  # dotfiles are ignored
    (tmp_path / "sharp" / "notes.txt").write_text("ignored")
    ds = PairedImageFolder(tmp_path)
    assert ds.names == ["0.jpg", "a/1.png", "b/2.png"]
    assert len(ds) == 3 and ds.root == tmp_path
    assert ds.pairs[1] == (tmp_path / "blur/a/1.png", tmp_path / "sharp/a/1.png")
    blur, sharp = ds[1]
    assert blur.shape == (3, 8, 8) and blur.dtype == torch.float32
    want = torch.from_numpy(_rgb(8, 8, 2)).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(blur, want)
    torch.testing.assert_close(sharp, want)
    assert ds.validate(full=True) == 3


def test_symlinked_subfolders_are_followed(tmp_path: Path) -> None:
    """blur/ and sharp/ holding symlinks to folders kept elsewhere: every pair is found (before:
    the linked folders were skipped, 12 pairs present, 8 found, no word)."""
    root, store = tmp_path / "data", tmp_path / "store"
    for i in range(8):
        _pair(root, f"{i}.png", _rgb(16, 16, i))
    for side in ("blur", "sharp"):
        for i in range(4):
            _save(store / side / "day2" / f"{i}.png", _rgb(16, 16, 100 + i))
        (root / side / "day2").symlink_to(store / side / "day2", target_is_directory=True)
    ds = PairedImageFolder(root)
    assert len(ds) == 12 and ds.validate(full=True) == 12
    assert "day2/3.png" in ds.names


@pytest.mark.parametrize("case", ["loop", "two_links", "broken_link"])
def test_symlinks_that_would_hide_or_repeat_images_are_errors(tmp_path: Path, case: str) -> None:
    _pair(tmp_path, "a.png", _rgb(16, 16))
    blur = tmp_path / "blur"
    if case == "loop":  # blur/sub/up -> blur: endless names, each image again and again
        (blur / "sub").mkdir()
        (blur / "sub" / "up").symlink_to(blur, target_is_directory=True)
        expected = r"blur/sub/up is .*blur again \(a symlink loop"
    elif case == "two_links":
        _save(tmp_path / "store" / "b.png", _rgb(16, 16, 1))
        for name in ("x", "y"):
            (blur / name).symlink_to(tmp_path / "store", target_is_directory=True)
        expected = r"blur/y is .*blur/x again"
    else:
        (blur / "gone.png").symlink_to(tmp_path / "nowhere.png")
        expected = r"broken link .*blur/gone.png -> .*nowhere.png"
    with pytest.raises(DatasetError, match=expected):
        PairedImageFolder(tmp_path)


def test_gopro_layout(tmp_path: Path) -> None:
    for seq in ("GOPR0002", "GOPR0001"):
        for i in range(2):
            _pair(tmp_path / seq, f"{i:06d}.png", _rgb(6, 10, i), _rgb(6, 10, 9))
    (tmp_path / "GOPR0001" / "blur_gamma").mkdir()  # GoPro's extra folders are ignored
    ds = PairedImageFolder(tmp_path)
    assert ds.names == [
        "GOPR0001/000000.png",
        "GOPR0001/000001.png",
        "GOPR0002/000000.png",
        "GOPR0002/000001.png",
    ]
    assert ds.pairs[3] == (
        tmp_path / "GOPR0002/blur/000001.png",
        tmp_path / "GOPR0002/sharp/000001.png",
    )
    blur, sharp = ds[0]
    assert blur.shape == sharp.shape == (3, 6, 10)
    assert blur.min() >= -1 and blur.max() <= 1
    assert ds.validate() == 4


# --- DatasetError: every case names the file and shows the layout ---------------------------


def _layout_error(root: Path, case: str) -> str:
    """Build a broken dataset under root; return the file name the error must mention."""
    if case == "missing_root":
        return str(root / "nope")
    if case == "no_folders":
        (root / "images").mkdir()
        return str(root)
    if case in ("missing_sharp", "missing_blur"):
        side = case.split("_")[1]
        other = "blur" if side == "sharp" else "sharp"
        _save(root / other / "0.png", _rgb(4, 4))
        return str(root / side)
    if case == "gopro_missing_sharp":
        _pair(root / "seqA", "0.png", _rgb(4, 4))
        _save(root / "seqB" / "blur" / "0.png", _rgb(4, 4))
        return str(root / "seqB" / "sharp")
    if case == "empty_blur":
        (root / "blur").mkdir()
        _save(root / "sharp" / "0.png", _rgb(4, 4))
        return str(root / "blur")
    if case == "empty_sharp":
        _save(root / "blur" / "0.png", _rgb(4, 4))
        (root / "sharp" / "sub").mkdir(parents=True)
        return str(root / "sharp")
    if case == "blur_without_sharp":
        _pair(root, "0.png", _rgb(4, 4))
        _save(root / "blur" / "x" / "lonely.png", _rgb(4, 4))
        return str(root / "blur" / "x" / "lonely.png")
    assert case == "sharp_without_blur"
    _pair(root, "0.png", _rgb(4, 4))
    _save(root / "sharp" / "lonely.jpg", _rgb(4, 4))
    return str(root / "sharp" / "lonely.jpg")


@pytest.mark.parametrize(
    "case",
    [
        "missing_root",
        "no_folders",
        "missing_sharp",
        "missing_blur",
        "gopro_missing_sharp",
        "empty_blur",
        "empty_sharp",
        "blur_without_sharp",
        "sharp_without_blur",
    ],
)
def test_constructor_errors(tmp_path: Path, case: str) -> None:
    culprit = _layout_error(tmp_path, case)
    root = tmp_path / "nope" if case == "missing_root" else tmp_path
    with pytest.raises(DatasetError, match=re.escape(culprit)) as info:
        PairedImageFolder(root)
    message = str(info.value)
    assert "|-- blur/" in message and "`-- sharp/" in message and "<sequence>/" in message
    assert isinstance(info.value, ValueError)


def _access_error(root: Path, case: str) -> tuple[str, int | None]:
    """A dataset whose pair 1 is broken; returns (culprit file, crop_size)."""
    _pair(root, "0.png", _rgb(16, 16))
    if case == "size_mismatch":
        _pair(root, "1.png", _rgb(16, 16), _rgb(16, 12))
        return str(root / "sharp" / "1.png"), None
    if case == "crop_too_large":
        _pair(root, "1.png", _rgb(16, 10))
        return str(root / "blur" / "1.png"), 12
    if case == "garbage":
        _save(root / "sharp" / "1.png", _rgb(16, 16))
        (root / "blur" / "1.png").write_bytes(b"this is not a PNG")
        return str(root / "blur" / "1.png"), None
    if case == "empty_file":
        _save(root / "blur" / "1.png", _rgb(16, 16))
        (root / "sharp" / "1.png").write_bytes(b"")
        return str(root / "sharp" / "1.png"), None
    suffix = ".png" if case == "truncated_png" else ".jpg"
    _pair(root, "1" + suffix, _rgb(64, 64))
    path = root / "sharp" / ("1" + suffix)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path), None


ACCESS_CASES = ["size_mismatch", "crop_too_large", "garbage", "empty_file"]


@pytest.mark.parametrize("case", [*ACCESS_CASES, "truncated_png", "truncated_jpeg"])
def test_access_time_errors(tmp_path: Path, case: str) -> None:
    culprit, crop = _access_error(tmp_path, case)
    ds = PairedImageFolder(tmp_path, crop_size=crop)  # cheap constructor: pairing is fine
    ds[0]
    with pytest.raises(DatasetError, match=re.escape(culprit)) as info:
        ds[1]
    assert "|-- blur/" in str(info.value)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("case", ACCESS_CASES)
def test_validate_finds_problems_up_front(tmp_path: Path, case: str, full: bool) -> None:
    culprit, crop = _access_error(tmp_path, case)
    with pytest.raises(DatasetError, match=re.escape(culprit)):
        PairedImageFolder(tmp_path, crop_size=crop).validate(full=full)


@pytest.mark.parametrize("case", ["truncated_png", "truncated_jpeg"])
def test_validate_full_finds_truncated_files(tmp_path: Path, case: str) -> None:
    culprit, _ = _access_error(tmp_path, case)
    with pytest.raises(DatasetError, match=re.escape(culprit)):
        PairedImageFolder(tmp_path).validate(full=True)


@pytest.mark.parametrize(("crop", "exc"), [(0, ValueError), (-3, ValueError), (8.0, TypeError)])
def test_bad_crop_size(tmp_path: Path, crop: object, exc: type) -> None:
    _pair(tmp_path, "0.png", _rgb(16, 16))
    with pytest.raises(exc, match="crop_size"):
        PairedImageFolder(tmp_path, crop_size=crop)


# --- crops, augmentation, caching -----------------------------------------------------------


@pytest.mark.parametrize("hw", [(40, 56), (48, 48)])
@pytest.mark.parametrize("crop", [None, 24])
def test_crop_and_augment_keep_pairs_aligned(tmp_path: Path, hw: tuple[int, int], crop) -> None:
    """blur = 255 - sharp on disk, so an aligned pair always satisfies blur == -sharp."""
    sharp = _rgb(*hw, 5)
    _pair(tmp_path, "0.png", 255 - sharp, sharp)
    ds = PairedImageFolder(tmp_path, crop_size=crop, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        b, s = ds[0]
        torch.testing.assert_close(b, -s, rtol=0, atol=1e-6)
        seen.add(s.numpy().tobytes())
        assert s.shape == ((3, crop, crop) if crop else (3, *hw))  # rot90 keeps shapes
    assert len(seen) >= 4  # crops/flips really vary (4 shape-keeping orientations at least)


def test_augment_reaches_all_eight_orientations_on_square(tmp_path: Path) -> None:
    img = _rgb(8, 8, 1)
    _pair(tmp_path, "0.png", img)
    ds = PairedImageFolder(tmp_path, augment=True)
    torch.manual_seed(0)
    seen = {ds[0][1].numpy().tobytes() for _ in range(200)}
    assert len(seen) == 8


def test_cache_keeps_decoded_arrays(tmp_path: Path) -> None:
    _pair(tmp_path, "0.png", _rgb(8, 8, 1), _rgb(8, 8, 2))
    plain, cached = PairedImageFolder(tmp_path), PairedImageFolder(tmp_path, cache=True)
    first = cached[0]
    for a, b in zip(first, plain[0], strict=True):
        assert torch.equal(a, b)
    for p in cached.pairs[0]:
        p.unlink()
    for a, b in zip(cached[0], first, strict=True):  # served from memory
        assert torch.equal(a, b)
    with pytest.raises(DatasetError, match="0.png"):
        plain[0]


def test_preload_decodes_everything(small_folder: Path) -> None:
    ds = PairedImageFolder(small_folder, crop_size=8)
    ds.preload()
    assert ds.cache and len(ds._cache) == len(ds) == 6
    loader = make_loader(ds, 3, shuffle=True, num_workers=2)
    assert [b.shape for b, _ in loader] == [(3, 3, 8, 8)] * 2


# --- make_loader ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for i in range(6):
        _pair(root, f"{i}.png", _rgb(20, 20, i), _rgb(20, 20, 10 + i))
    return root


def _epochs(root: Path, seed: int, workers: int, n_epochs: int = 2) -> list[list[torch.Tensor]]:
    ds = PairedImageFolder(root, crop_size=12, augment=True)
    loader = make_loader(ds, 4, shuffle=True, num_workers=workers, seed=seed)
    return [[t for batch in loader for t in batch] for _ in range(n_epochs)]


@pytest.mark.parametrize("workers", [0, 2])
def test_make_loader_is_deterministic(small_folder: Path, workers: int) -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    a = _epochs(small_folder, 0, workers)
    torch.manual_seed(456)
    b = _epochs(small_folder, 0, workers)
    c = _epochs(small_folder, 1, workers)
    for ea, eb in zip(a, b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ea, eb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], a[1], strict=True))  # new epoch
    assert [t.shape for t in a[0]] == [(4, 3, 12, 12)] * 2 + [(2, 3, 12, 12)] * 2


def test_make_loader_options(small_folder: Path) -> None:
    ds = PairedImageFolder(small_folder)
    loader = make_loader(ds, 4, shuffle=False, drop_last=True)
    assert loader.num_workers == 0 and not loader.pin_memory
    assert len(list(loader)) == 1
    sub = torch.utils.data.Subset(ds, [0, 1])
    assert len(list(make_loader(sub, 1, shuffle=True))) == 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            make_loader(ds, bad, shuffle=False)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(ds, 1, shuffle=False, num_workers=-1)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_synth_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--n_train", "2", "--n_test", "1", "--size", "32"]
    assert main(argv) == 0
    assert "2 train + 1 test" in capsys.readouterr().out
    assert main(["check", str(out / "train"), "--full"]) == 0
    assert "2 pairs OK" in capsys.readouterr().out
    (out / "train" / "sharp" / "0001.png").unlink()
    assert main(["check", str(out / "train")]) == 1
    err = capsys.readouterr().err
    assert "0001.png" in err and "|-- blur/" in err
    assert main(["check", str(out / "test"), "--crop_size", "33"]) == 1
    assert "crop_size 33" in capsys.readouterr().err


def test_cli_synth_into_a_place_that_cannot_hold_a_folder_exits_2(tmp_path, capsys) -> None:
    """Before: a NotADirectoryError traceback. Now: exit 2, one line, nothing created."""
    (tmp_path / "file").write_text("not a folder")
    for out, says in ((tmp_path / "file" / "data", "is a file, not a folder"),
                      (Path("/proc/deblur_data"), "/proc is not writable")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(["synth", "--out", str(out), "--n_train", "1", "--n_test", "1", "--size", "32"])
        assert info.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--out {out}: " in line and says in line
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "--n_train", "0"],
        ["synth", "--n_test", "-1"],
        ["synth", "--size", "16"],
        ["synth", "--size", "big"],
        ["synth", "--seed", "-1"],
        ["check"],
        [],
    ],
)
def test_cli_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_module_entry_point(tiny_data: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deblur_lib.data", "check", str(tiny_data / "test")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "4 pairs OK" in result.stdout  # tiny_data: 8 train + 4 test pairs


# --- training order and crops: GlobalBatchSampler, KeyedCrops -----------------------------
def _global_batches(n: int, batch: int, world: int, epoch: int = 0) -> list[list[int]]:
    """The global batches N ranks build together (rank slices concatenated per step)."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, batch, rank, world, seed=3)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == len(sampler) and {e for e, _, _ in keys} == {epoch}
        local = batch // world
        per_rank.append([keys[k : k + local] for k in range(0, len(keys), local)])
    return [sum((r[step] for r in per_rank), []) for step in range(len(per_rank[0]))]


@pytest.mark.parametrize("n, batch", [(8, 4), (10, 4), (3, 4), (7, 2), (5, 1)])
def test_same_global_batches_for_any_world_size(n, batch):
    one = _global_batches(n, batch, 1)
    assert all(len(b) == batch for b in one) and len(one) == math.ceil(n / batch)
    assert [k for _, k, _ in sum(one, [])] == list(range(len(one) * batch))  # positions
    assert {i for _, _, i in sum(one, [])} == set(range(n))  # every image (wrapped to fill)
    for world in (w for w in (2, 4) if batch % w == 0):
        assert _global_batches(n, batch, world) == one
    assert _global_batches(n, batch, 1, epoch=1) != one or n < 3  # reshuffled per epoch


def test_batch_not_divisible_by_ranks():
    with pytest.raises(ValueError, match="divisible by the 2 ranks"):
        GlobalBatchSampler(8, 3, 0, 2)


def test_keyed_crops_do_not_depend_on_order_or_workers(tiny_data):
    ds = PairedImageFolder(tiny_data / "train", crop_size=24, augment=True)
    keyed = KeyedCrops(ds, seed=5)
    a = keyed[(2, 6, 6)]
    keyed[(0, 1, 1)], keyed[(1, 6, 6)]  # other draws in between
    b = keyed[(2, 6, 6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], keyed[(3, 6, 6)][0])  # another epoch, another crop
    assert not torch.equal(a[0], keyed[(2, 14, 6)][0])  # drawn again: another crop
    sampler = GlobalBatchSampler(len(ds), 4, seed=5)
    serial = [t for batch in make_loader(keyed, 4, shuffle=False, sampler=sampler) for t in batch]
    workers = make_loader(keyed, 4, shuffle=False, sampler=sampler, num_workers=2)
    parallel = [t for batch in workers for t in batch]
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel, strict=True))


def test_the_largest_seed_reaches_every_generator(tiny_data):
    """--seed accepts up to 2**32 - 1; the seeds derived from it (per epoch, per sample) wrap
    at torch's 64 bits instead of overflowing (before: ValueError from inside the loader)."""
    ds = PairedImageFolder(tiny_data / "train", crop_size=24, augment=True)
    seed = 2**32 - 1
    sampler = GlobalBatchSampler(len(ds), 4, seed=seed)
    sampler.set_epoch(49)
    keys = list(sampler)
    blur, _ = KeyedCrops(ds, seed=seed)[keys[-1]]
    assert blur.shape == (3, 24, 24) and len(keys) == 8
