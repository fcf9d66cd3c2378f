"""deblur_lib.predict: the deblur() API (types, ranges, modes, alpha), tiling and its blending,
automatic tiling under a memory budget, TLC, self-ensemble, shift-aligned scoring, and the CLI
(formats and bit depths, EXIF, folders, failures, usage errors, metrics.csv, models:/)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deblur_lib import models, predict
from deblur_lib.metrics import PSNR_CAP_DB
from deblur_lib.models import build_model
from deblur_lib.predict import (
    LocalMeanPool2d,
    NonFiniteOutputError,
    aligned_scores,
    deblur,
    estimate_memory_mb,
    plan_tiling,
    tile_starts,
    tile_windows,
    with_local_statistics,
)
from deblur_lib.predict import __main__ as cli
from deblur_lib.predict.__main__ import main
from deblur_lib.weights import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """A tiny DeblurNet with random (non-identity) weights."""
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


class Recorder(nn.Module):
    """Wraps a model and records the input shape of every forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.shapes = inner, []
        self.width, self.multiple = getattr(inner, "width", 8), getattr(inner, "multiple", 1)

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def pointwise() -> nn.Module:
    """A 1x1 convolution: no spatial context, so tiling cannot change its output."""
    torch.manual_seed(1)
    return nn.Conv2d(3, 3, 1)


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth model-space (3, h, w) image."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, max(h // 8, 2), max(w // 8, 2)), generator=g)
    return (F.interpolate(coarse, size=(h, w), mode="bilinear")[0] * 2 - 1).contiguous()


def u8(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    arr = ((image(h, w, seed).permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    return arr if c == 3 else arr[..., 0]


# --- the API: types, ranges, modes --------------------------------------------------------------
def test_tensor_in_tensor_out(net):
    x = torch.stack([image(24, 40, 0), image(24, 40, 1)])
    y = deblur(net, x, channels_last=False)  # the layout the reference runs in: bit-exact
    with torch.inference_mode():
        ref = net(x).clamp(-1, 1)
    assert torch.equal(y, ref) and not y.is_inference()
    torch.testing.assert_close(deblur(net, x), ref, atol=1e-5, rtol=0)  # default: channels_last
    single = deblur(net, x[0].half())
    assert single.shape == (3, 24, 40) and single.dtype == torch.float16
    torch.testing.assert_close(single.float(), ref[0], atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\).*got shape \(4, 24, 40\)"):
        deblur(net, torch.zeros(4, 24, 40))


def test_training_flags_and_weights_restored(net):
    model = build_model("tiny")
    model.load_state_dict(net.state_dict())
    model.train()
    model.encoders.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deblur(model, image(16, 16), channels_last=True, tlc=8)
    deblur(model, image(16, 16))
    assert model.training and not model.encoders[0].training and model.decoders[0].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.encoders[0][0].sca[0], nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((20, 28, 3), np.uint8), ((20, 28), np.uint16), ((20, 28, 4), np.uint8),
     ((20, 28, 3), np.float32), ((20, 28), np.float64), ((20, 28, 4), np.uint16)],
)  # fmt: skip
def test_numpy_round_trip_exact_with_identity(shape, dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        arr = rng.random(shape).astype(dtype)
    else:
        arr = rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
    out = deblur(nn.Identity(), arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    if arr.dtype.kind == "f":
        np.testing.assert_allclose(out, arr, atol=1e-6)
    else:
        np.testing.assert_array_equal(out, arr)


def test_numpy_alpha_is_untouched_and_gray_stays_gray(net):
    rgba = np.dstack([u8(20, 28), np.arange(20 * 28, dtype=np.uint8).reshape(20, 28)])
    out = deblur(net, rgba)
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    assert not np.array_equal(out[..., :3], rgba[..., :3])
    assert deblur(net, u8(20, 28, c=1)).shape == (20, 28)


@pytest.mark.parametrize(
    ("arr", "error", "match"),
    [(np.full((8, 8, 3), 1.5, np.float32), ValueError, r"\[0, 1\].*shape \(8, 8, 3\)"),
     (np.zeros((8, 8, 2), np.uint8), ValueError, r"got shape \(8, 8, 2\)"),
     (np.zeros((8, 8, 3), np.int32), TypeError, "int32")],
)  # fmt: skip
def test_numpy_input_errors(arr, error, match):
    with pytest.raises(error, match=match):
        deblur(nn.Identity(), arr)


@pytest.mark.parametrize(
    ("mode", "out_mode"),
    [("L", "L"), ("I;16", "I;16"), ("I", "I"), ("RGB", "RGB"), ("RGBA", "RGBA"), ("LA", "LA"),
     ("P", "RGB"), ("1", "L"), ("CMYK", "RGB")],
)  # fmt: skip
def test_pil_modes(net, mode, out_mode):
    rgb = Image.fromarray(u8(20, 28))
    if mode in ("I;16", "I"):
        img = Image.fromarray(u8(20, 28, c=1).astype(np.uint16) * 257)
        img = img if mode == "I;16" else img.convert("I")
    else:
        img = rgb.convert(mode)
    img.info["icc_profile"] = b"fake-icc"
    out = deblur(net, img)
    assert (out.mode, out.size, out.info.get("icc_profile")) == (out_mode, img.size, b"fake-icc")
    if mode in ("RGBA", "LA"):
        np.testing.assert_array_equal(np.asarray(out)[..., -1], np.asarray(img)[..., -1])
    if mode in ("L", "I;16", "RGB"):
        np.testing.assert_array_equal(np.asarray(deblur(nn.Identity(), img)), np.asarray(img))


def test_palette_with_transparency_becomes_rgba(net):
    pal = Image.fromarray(u8(20, 28)).convert("P")
    pal.info["transparency"] = 0
    assert deblur(net, pal).mode == "RGBA"


def test_lists_are_batched_by_size():
    rec = Recorder(nn.Identity())
    items = [image(16, 24, 0), u8(16, 24), image(16, 24, 1), Image.fromarray(u8(20, 20))]
    out = deblur(rec, items, batch_size=4)
    assert [type(o) for o in out] == [torch.Tensor, np.ndarray, torch.Tensor, Image.Image]
    assert sorted(rec.shapes) == [(1, 3, 20, 20), (3, 3, 16, 24)]


def test_nonfinite_output_raises():
    class Broken(nn.Module):
        def forward(self, x):
            return x * float("nan")

    with pytest.raises(NonFiniteOutputError, match=r"shape \(1, 3, 8, 8\)"):
        deblur(Broken(), torch.zeros(3, 8, 8))


# --- tiling -----------------------------------------------------------------------------------
def test_tile_covering_the_image_is_the_whole_image(net):
    x = image(24, 40)
    assert torch.equal(deblur(net, x, tile=40), deblur(net, x))


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(40, 56, 16, 4), (37, 53, 20, 7), (33, 17, 16, 0)])  # fmt: skip  # noqa: E501
def test_tiled_equals_whole_without_spatial_context(h, w, tile, overlap):
    model, x = pointwise(), image(h, w)
    rec = Recorder(model)
    tiled = deblur(rec, x, tile=tile, tile_overlap=overlap, batch_size=3)
    torch.testing.assert_close(tiled, deblur(model, x), atol=1e-6, rtol=0)
    assert len({s[1:] for s in rec.shapes}) == 1  # batches of equal-size tiles
    assert max(s[0] for s in rec.shapes) == 3


def test_blending_weights_sum_to_one_and_constant_is_exact():
    for length, tile, overlap in [(100, 32, 8), (64, 20, 6), (50, 16, 0)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert max(b - a for a, b in zip(starts[:-1], starts[1:], strict=True)) <= tile - overlap
        total = torch.zeros(length)
        for s, wnd in zip(starts, tile_windows(starts, tile), strict=True):
            total[s : s + tile] += wnd
        torch.testing.assert_close(total, torch.ones(length), atol=1e-6, rtol=0)
    const = torch.full((3, 45, 61), 0.3)
    out = deblur(nn.Identity(), const, tile=16, tile_overlap=6)
    assert (out - 0.3).abs().max() <= 1e-6


def test_automatic_tiling_under_a_memory_budget(net):
    assert plan_tiling(net, 40, 56).tile is None
    budget = estimate_memory_mb(net.width, 20, 20, net.multiple)
    plan = plan_tiling(net, 40, 56, max_memory_mb=budget, tile_overlap=4)
    assert plan.tile == (20, 20) and plan.estimate_mb <= budget and plan.batch == 1
    rec = Recorder(net)
    deblur(rec, image(40, 56), max_memory_mb=budget, tile_overlap=4)
    assert set(rec.shapes) == {(1, 3, 20, 20)}


def test_default_budget_tiles_a_6000x4000_photo_with_the_small_preset():
    small = build_model("small")
    whole = estimate_memory_mb(small.width, 4000, 6000, small.multiple)
    plan = plan_tiling(small, 4000, 6000)
    assert whole > predict.DEFAULT_MAX_MEMORY_MB >= plan.estimate_mb
    assert plan.tile is not None and plan.tile[0] >= 2048


# --- TLC --------------------------------------------------------------------------------------
def test_local_mean_pool_matches_avg_pool():
    x = torch.randn(2, 4, 11, 17)
    ref = F.avg_pool2d(x, 5, stride=1)
    out = LocalMeanPool2d(5)(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[..., 2 : 2 + ref.shape[-2], 2 : 2 + ref.shape[-1]], ref)
    torch.testing.assert_close(out[..., :2, 2:-2], ref[..., :1, :].expand(-1, -1, 2, -1))
    assert LocalMeanPool2d(20)(x).shape == (2, 4, 1, 1)


def test_tlc_window_covering_the_image_changes_nothing():
    torch.manual_seed(0)
    net = build_model("tiny")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)  # strong enough channel attention to see its statistics
    x = torch.stack([image(24, 40)])
    with torch.inference_mode():
        torch.testing.assert_close(with_local_statistics(net, 40)(x), net(x))
        assert not torch.allclose(with_local_statistics(net, 8)(x), net(x), atol=1e-3)


def test_tiling_gap_helper(net):
    xs = [image(32, 48, 0), image(32, 48, 1)]
    gap = predict.tiling_gap(net, xs, xs, tile=24, tile_overlap=8)
    assert set(gap) == {"tiled_vs_whole", "whole", "tiled"} and len(gap["whole"]) == 2
    assert all(20 < v < PSNR_CAP_DB for v in gap["tiled_vs_whole"])
    same = predict.tiling_gap(pointwise(), xs, tile=24, tile_overlap=8)
    assert all(v > 100 - 1e-6 for v in same["tiled_vs_whole"])


# --- ensemble and aligned scores --------------------------------------------------------------
def test_ensemble_of_identity_is_identity(net):
    x = image(18, 30)
    for n in predict.ENSEMBLE_SIZES:
        torch.testing.assert_close(deblur(nn.Identity(), x, ensemble=n), x, atol=1e-6, rtol=0)
    rec = Recorder(pointwise())
    torch.testing.assert_close(deblur(rec, x, ensemble=8), deblur(pointwise(), x))
    assert {s[2:] for s in rec.shapes} == {(18, 30), (30, 18)}
    assert not torch.allclose(deblur(net, x, ensemble=8), deblur(net, x))
    with pytest.raises(ValueError, match="ensemble must be one of"):
        deblur(net, x, ensemble=3)


def test_aligned_scores_find_a_known_shift():
    sharp = (image(48, 56) + 1) / 2
    moved = torch.roll(sharp, shifts=(2, -1), dims=(-2, -1))  # moved[y+2, x-1] = sharp[y, x]
    p, s, dy, dx = aligned_scores(moved, sharp, max_shift=3)
    assert (dy, dx) == (2, -1) and p == PSNR_CAP_DB and s == pytest.approx(1.0, abs=1e-5)
    p0, *_, dy0, dx0 = aligned_scores(moved, sharp, max_shift=0)
    assert (dy0, dx0) == (0, 0) and p0 < 40
    with pytest.raises(ValueError, match="does not fit"):
        aligned_scores(sharp, sharp, max_shift=24)


# --- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(net, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    config = {"model_size": "tiny", "model_width": None, "crop_size": 64}
    save_checkpoint(path, {"model": net.state_dict(), "config": config})
    return path


@pytest.fixture(scope="module")
def identity_ckpt(tmp_path_factory) -> Path:
    """An untrained DeblurNet: exactly the identity (residual starts at zero)."""
    path = tmp_path_factory.mktemp("ident") / "best.pt"
    config = {"model_size": "tiny", "model_width": None, "crop_size": 64}
    save_checkpoint(path, {"model": build_model("tiny").state_dict(), "config": config})
    return path


def _photo_folder(root: Path) -> dict[str, Image.Image]:
    """Every supported kind of input under root (nested), by relative name."""
    rgb = Image.fromarray(u8(24, 32))
    gray16 = Image.fromarray(u8(24, 32, c=1).astype(np.uint16) * 257)
    rgba = Image.fromarray(np.dstack([u8(24, 32), np.full((24, 32), 77, np.uint8)]))
    images = {
        "rgb.png": rgb,
        "sub/gray8.png": rgb.convert("L"),
        "sub/gray16.png": gray16,
        "sub/deeper/rgba.png": rgba,
        "sub/deeper/pal.png": rgb.convert("P"),
        "photo.jpg": rgb,
    }
    for rel, img in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "photo.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90 degrees clockwise to display
            exif[0x010F] = "camera maker"
            img.save(root / rel, quality=95, exif=exif)
        else:
            img.save(root / rel)
    return images


def test_cli_folder_formats_modes_and_exif(ckpt, tmp_path, capsys):
    _photo_folder(tmp_path / "in")
    code = main(["--model", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "6 deblurred, 0 failed"
    out = tmp_path / "out"
    expect = {"rgb.png": ("PNG", "RGB"), "sub/gray8.png": ("PNG", "L"),
              "sub/gray16.png": ("PNG", "I;16"), "sub/deeper/rgba.png": ("PNG", "RGBA"),
              "sub/deeper/pal.png": ("PNG", "RGB"), "photo.jpg": ("JPEG", "RGB")}  # fmt: skip
    for rel, (fmt, mode) in expect.items():
        with Image.open(out / rel) as img:
            assert (img.format, img.mode) == (fmt, mode), rel
            size, exif = img.size, img.getexif()
            alpha = np.asarray(img)[..., 3] if mode == "RGBA" else None
        assert size == ((24, 32) if rel == "photo.jpg" else (32, 24)), rel
        if rel == "photo.jpg":  # upright, no orientation tag, the other tags kept
            assert 0x0112 not in exif and exif[0x010F] == "camera maker"
        if alpha is not None:
            assert (alpha == 77).all()
    with Image.open(out / "sub/gray16.png") as img:
        assert np.asarray(img).max() > 255  # 16 bits used, not an 8-bit image widened


def test_cli_corrupt_file_is_a_named_failure(ckpt, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(u8(16, 16)).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = main(["--model", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out")])  # fmt: skip
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 1 and line.startswith("1 deblurred, 1 failed: bad.png (unreadable")
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "bad.png").exists()


def _usage_error(args: list[str], capsys, match: str) -> None:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m deblur_lib.predict: error: ") and match in err, err


def test_cli_usage_errors_write_nothing(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "in").mkdir()
    Image.fromarray(u8(16, 16)).save(tmp_path / "in" / "a.png")
    (tmp_path / "file.txt").write_text("x")
    out = str(tmp_path / "out")
    m, i = ["--model", str(ckpt)], ["--input", str(tmp_path / "in")]
    _usage_error([*m, "--input", str(tmp_path / "nope"), "--output", out], capsys, "not found")
    _usage_error([*m, *i, "--output", str(tmp_path / "file.txt")], capsys, "not a folder")
    _usage_error([*m, "--input", str(tmp_path / "file.txt"), "--output", out], capsys, "PNG/JPEG")
    _usage_error(["--model", str(tmp_path / "missing.pt"), *i, "--output", out], capsys, "--model")
    _usage_error([*m, *i, "--output", out, "--tile", "64", "--tile_overlap", "64"], capsys, "<")
    _usage_error([*m, *i, "--output", out, "--ensemble", "3"], capsys, "invalid choice")
    _usage_error([*m, *i, "--output", out, "--align_shift", "2"], capsys, "--sharp")
    _usage_error([*i, "--output", out, "--bogus"], capsys, "unrecognized arguments")
    monkeypatch.setattr(models, "PRETRAINED_DIR", tmp_path / "no_pretrained")
    _usage_error([*i, "--output", out], capsys, "--model is required")
    absent_db = tmp_path / "absent.db"
    _usage_error(["--model", "models:/x/1", "--tracking_uri", f"sqlite:///{absent_db}", *i,
                  "--output", out], capsys, "no MLflow store")  # fmt: skip
    assert not Path(out).exists() and not absent_db.exists()


def test_cli_never_writes_into_or_over_its_inputs(identity_ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(u8(16, 16)).save(src / "a.png")
    before = (src / "a.png").read_bytes()
    m = ["--model", str(identity_ckpt), "--input", str(src)]
    _usage_error([*m, "--output", str(src / "restored")], capsys, "inside the input folder")
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    _usage_error([*m, "--output", str(tmp_path / "link")], capsys, "inside the input folder")
    _usage_error([*m, "--output", str(src), "--overwrite"], capsys, "refusing to overwrite")
    one = ["--model", str(identity_ckpt), "--input", str(src / "a.png")]
    _usage_error([*one, "--output", str(src)], capsys, "refusing to overwrite")
    assert not (src / "restored").exists() and (src / "a.png").read_bytes() == before
    for _ in range(2):  # a rerun does not pick up its own outputs
        assert main([*m, "--output", str(src / "restored"), "--overwrite"]) == 0
        assert capsys.readouterr().out.strip().endswith("1 deblurred, 0 failed")
    assert sorted(p.name for p in (src / "restored").iterdir()) == ["a.png"]


def test_cli_metrics_csv_and_align_shift(identity_ckpt, tmp_path, capsys):
    """The identity model restores each input exactly, so the restored and blurred scores
    agree, and the shifted copy is found at its shift."""
    (tmp_path / "blur").mkdir()
    (tmp_path / "sharp").mkdir()
    sharp = u8(40, 48)
    Image.fromarray(sharp).save(tmp_path / "sharp" / "a.png")
    Image.fromarray(np.roll(sharp, (1, -2), axis=(0, 1))).save(tmp_path / "blur" / "a.png")
    Image.fromarray(u8(40, 48, seed=3)).save(tmp_path / "blur" / "b.png")
    Image.fromarray(u8(40, 48, seed=4)).save(tmp_path / "sharp" / "b.png")
    Image.fromarray(u8(40, 48)).save(tmp_path / "blur" / "lonely.png")
    code = main(["--model", str(identity_ckpt), "--input", str(tmp_path / "blur"), "--output",
                 str(tmp_path / "out"), "--sharp", str(tmp_path / "sharp"), "--align_shift", "2"])  # fmt: skip  # noqa: E501
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and lines[0].startswith("2 deblurred, 1 failed: lonely.png (no sharp image")
    assert lines[1].startswith("mean over 2 images: psnr ")
    with open(tmp_path / "out" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == cli.CSV_COLUMNS
    a = next(r for r in rows if r["name"] == "a.png")
    assert (a["shift_y"], a["shift_x"], a["blurred_shift_y"], a["blurred_shift_x"]) == (
        "1",
        "-2",
        "1",
        "-2",
    )  # noqa: E501
    assert float(a["psnr"]) == float(a["blurred_psnr"]) == PSNR_CAP_DB
    b = next(r for r in rows if r["name"] == "b.png")
    assert float(b["psnr"]) == pytest.approx(float(b["blurred_psnr"])) and float(b["ssim"]) < 1


def test_cli_tiles_ensemble_and_tlc(ckpt, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(u8(40, 56)).save(tmp_path / "in" / "a.png")
    outs = {}
    for name, extra in {"whole": [], "tiled": ["--tile", "24", "--tile_overlap", "8"],
                        "tlc": ["--tlc", "--ensemble", "2"]}.items():  # fmt: skip
        args = ["--model", str(ckpt), "--input", str(tmp_path / "in" / "a.png"), "--output",
                str(tmp_path / name), *extra]  # fmt: skip
        assert main(args) == 0
        outs[name] = np.asarray(Image.open(tmp_path / name / "a.png")).astype(int)
    assert outs["whole"].shape == outs["tiled"].shape == outs["tlc"].shape == (40, 56, 3)
    assert np.abs(outs["whole"] - outs["tiled"]).max() > 0
    capsys.readouterr()


def test_cli_batches_equal_sizes_and_runs_tiled_images_alone(ckpt, tmp_path, monkeypatch, capsys):
    calls = []
    restore = predict._Engine.restore

    def spy(self, xs):
        calls.append(len(xs))
        return restore(self, xs)

    monkeypatch.setattr(predict._Engine, "restore", spy)
    (tmp_path / "in").mkdir()
    for name, (h, w) in {"a": (16, 24), "b": (16, 24), "c": (16, 24), "d": (24, 24)}.items():
        Image.fromarray(u8(h, w)).save(tmp_path / "in" / f"{name}.png")
    args = ["--model", str(ckpt), "--input", str(tmp_path / "in"), "--batch_size", "2"]
    assert main([*args, "--output", str(tmp_path / "o1")]) == 0
    assert calls == [2, 1, 1]
    calls.clear()
    tiny_budget = ["--max_memory_mb", "0.05", "--tile_overlap", "4"]
    assert main([*args, "--output", str(tmp_path / "o2"), *tiny_budget]) == 0
    assert calls == [1, 1, 1, 1]
    capsys.readouterr()


def test_cli_registry_model(net, mlflow_store, tmp_path, capsys):
    from mlflow import MlflowClient

    from deblur_lib.train.tracking import Tracker

    tracker = Tracker("predict-test", mlflow_store, tmp_path, artifact_location=tmp_path / "a")
    tracker.start(run_name="predict")
    tracker.log_model(net, "predict-test", preset="tiny")
    tracker.end()
    MlflowClient(mlflow_store).set_registered_model_alias("predict-test", "prod", "1")
    Image.fromarray(u8(16, 24)).save(tmp_path / "a.png")
    ref = deblur(net, Image.fromarray(u8(16, 24)))
    args = ["--model", "models:/predict-test@prod", "--tracking_uri", mlflow_store, "--input",
            str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), ref)
    capsys.readouterr()


def test_cli_default_model_is_the_shipped_one(net, tmp_path, monkeypatch, capsys):
    ship = tmp_path / "pretrained"
    w, c = models.save_weights(net, tmp_path / "tmp", preset="tiny")
    ship.mkdir()
    w.rename(ship / f"{models.DEFAULT_MODEL}.pt")
    c.rename(ship / f"{models.DEFAULT_MODEL}.json")
    monkeypatch.setattr(models, "PRETRAINED_DIR", ship)
    Image.fromarray(u8(16, 24)).save(tmp_path / "a.png")
    assert main(["--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == "1 deblurred, 0 failed"


def test_module_entry_point_usage_error(tmp_path):
    """`python -m deblur_lib.predict` itself: exit 2 and one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "deblur_lib.predict", "--input", str(tmp_path / "x.png"),
         "--output", str(tmp_path / "out"), "--model", "best.pt"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"python -m deblur_lib.predict: error: input not found: {tmp_path / 'x.png'}"
    )
