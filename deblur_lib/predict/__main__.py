"""``python -m deblur_lib.predict``: deblur image files and folders with ``predict.deblur``.

``python -m deblur_lib.predict --model M --input PATH [PATH ...] --output DIR``, see
``--help``. Outputs keep each image's path relative to its input folder (a file input: its
name), extension, bit depth and mode; PNG in, PNG out; JPEG in, JPEG out at quality 95 with
4:4:4 chroma (``--jpeg_quality``). EXIF orientation is applied on read and the image written
upright without the orientation tag (the other EXIF tags and the ICC profile are kept).
Pillow reads 16-bit colour PNGs at 8 bits (as ``deblur_lib.data``), so they are written as
8-bit; 16-bit gray stays 16-bit. Exit codes: 0 all images deblurred, 1 some failed (each is
named in the summary line), 2 usage error (one line, nothing written).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from deblur_lib.data import EXIF_ORIENTATION, IMAGE_SUFFIXES, UPRIGHT, exif_orientation
from deblur_lib.metrics import denormalize
from deblur_lib.models import DEFAULT_MODEL, ModelInfo, WeightsError, shipped_models
from deblur_lib.predict import (
    DEFAULT_MAX_MEMORY_MB,
    ENSEMBLE_SIZES,
    NonFiniteOutputError,
    _array_to_model,
    _Engine,
    _options,
    _pil_to_array,
    _unpack,
    aligned_scores,
)
from deblur_lib.weights import load_model

PROG = "python -m deblur_lib.predict"
DEFAULT_TLC_CROP = 256  # px; the training crop assumed when a model does not record it
JPEG_QUALITY = 95  # default JPEG output quality; chroma is kept at 4:4:4 (subsampling=0)
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # as data.py
CSV_COLUMNS = ("name", "psnr", "ssim", "blurred_psnr", "blurred_ssim", "shift_y", "shift_x",
               "blurred_shift_y", "blurred_shift_x")  # fmt: skip


# --- files --------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode a PNG/JPEG and apply its EXIF orientation (the result is upright, its EXIF without
    the orientation tag). The orientation is read from the header as in training and
    evaluation (``data.exif_orientation``), so a pair is seen the same way by both. Raises what
    Pillow raises on an unreadable file (OSError, ...)."""
    with Image.open(path) as img:
        orientation = exif_orientation(img)
        img.load()
        upright = img.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else img.copy()
    exif = upright.getexif()
    if EXIF_ORIENTATION in exif:
        del exif[EXIF_ORIENTATION]
        upright.info["exif"] = exif.tobytes()
    return upright


def _save_params(img: Image.Image, suffix: str, jpeg_quality: int) -> dict[str, Any]:
    params: dict[str, Any] = {}
    exif = img.getexif()
    exif.pop(0x0112, None)  # Orientation: the pixels are upright now
    if len(exif):
        params["exif"] = exif.tobytes()
    if "icc_profile" in img.info:
        params["icc_profile"] = img.info["icc_profile"]
    if suffix in (".jpg", ".jpeg"):
        params.update(format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        params["format"] = "PNG"
    return params


def write_image(
    img: Image.Image, path: Path, source: Image.Image, jpeg_quality: int = JPEG_QUALITY
) -> None:
    """Write ``img`` to ``path`` in the format of its extension, with ``source``'s EXIF (no
    orientation) and ICC profile; atomically (a temporary file, then ``os.replace``)."""
    params = _save_params(source, path.suffix.lower(), jpeg_quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, **params)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _metric_rgb(img: Image.Image) -> Tensor:
    """(3, H, W) metric space [0, 1] of any supported image (alpha dropped, gray replicated)."""
    arr, _ = _pil_to_array(img)
    x, _ = _array_to_model(arr)
    return denormalize(x)


# --- command line -------------------------------------------------------------------------------
class UsageError(Exception):
    """A command-line mistake: printed as one line, exit 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


@dataclass
class _Job:
    src: Path
    rel: str
    dst: Path
    sharp: Path | None = None


@dataclass
class _Report:
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog=PROG,
        description="Deblur PNG/JPEG images with a DeblurNet (see deblur_lib/predict.py).",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS, a checkpoint "
        "(best.pt/last.pt), NAME.pt beside its NAME.json card (what train.export writes), a "
        "folder with config.json + weights.pt, or shipped weights "
        f"(default {DEFAULT_MODEL} when installed)",
    )
    ap.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="image files and/or folders (searched recursively)",
    )
    ap.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="output folder (keeps relative paths and names)",
    )
    ap.add_argument(
        "--sharp",
        default=None,
        metavar="DIR",
        help="ground truth with the same relative names: writes DIR/metrics.csv",
    )
    ap.add_argument(
        "--align_shift",
        type=int,
        default=0,
        metavar="K",
        help="score at the best integer shift within +-K px, K px border cropped",
    )
    ap.add_argument("--tile", type=int, default=None, metavar="SIZE", help="tile side, px")
    ap.add_argument(
        "--tile_overlap",
        type=int,
        default=32,
        metavar="PX",
        help="px shared by neighbouring tiles (default 32)",
    )
    ap.add_argument(
        "--max_memory_mb",
        type=float,
        default=DEFAULT_MAX_MEMORY_MB,
        help="activation budget per forward; larger images are tiled "
        f"(default {DEFAULT_MAX_MEMORY_MB:.0f})",
    )
    ap.add_argument("--batch_size", type=int, default=4, help="images/tiles per forward (max)")
    ap.add_argument(
        "--ensemble",
        type=int,
        default=1,
        choices=ENSEMBLE_SIZES,
        help="self-ensemble of flips/rotations",
    )
    ap.add_argument(
        "--tlc",
        action="store_true",
        help="test-time local statistics (NAFNet TLC) instead of global pooling",
    )
    ap.add_argument(
        "--tlc_size",
        type=int,
        default=None,
        metavar="PX",
        help="TLC window (default 1.5x the model's training crop, else 384)",
    )
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "off"),
        help="bf16 autocast (auto: on CUDA only)",
    )
    ap.add_argument(
        "--jpeg_quality",
        type=int,
        default=JPEG_QUALITY,
        help=f"JPEG output quality, 4:4:4 chroma (default {JPEG_QUALITY})",
    )
    ap.add_argument(
        "--tracking_uri",
        default=None,
        help="MLflow URI for models:/ (default $MLFLOW_TRACKING_URI or sqlite)",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --output inside an input folder (input files are never replaced)",
    )
    return ap


def _list_images(folder: Path, skip: Path | None) -> list[Path]:
    """PNG/JPEG files under ``folder`` (recursive; dotfiles and anything under ``skip``
    left out), sorted."""
    found, root = [], folder.resolve()
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.suffix.lower() not in IMAGE_SUFFIXES or any(s.startswith(".") for s in rel.parts):
            continue
        if skip is not None and skip != root and p.resolve().is_relative_to(skip):
            continue
        if p.is_file():
            found.append(p)
    return sorted(found)


def plan_jobs(args: argparse.Namespace) -> list[_Job]:
    """Check inputs and output (nothing is written) and map each input image to its output.
    Raises UsageError."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is not a folder")
    out_res = out.resolve()
    sharp = Path(args.sharp) if args.sharp is not None else None
    if sharp is not None and not sharp.is_dir():
        raise UsageError(f"--sharp {sharp} is not a folder")
    protected = [Path(p) for p in args.input if Path(p).is_dir()] + ([sharp] if sharp else [])
    for folder in protected:
        res = folder.resolve()
        if (out_res == res or out_res.is_relative_to(res)) and not args.overwrite:
            raise UsageError(
                f"--output {out} is inside the input folder {folder}; choose another folder "
                "or pass --overwrite (input files are never replaced)"
            )
    jobs: list[_Job] = []
    seen: dict[str, Path] = {}
    for raw in args.input:
        path = Path(raw)
        if path.is_dir():
            files = [(p, p.relative_to(path).as_posix()) for p in _list_images(path, out_res)]
            if not files:
                raise UsageError(f"no PNG/JPEG images under {path}")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UsageError(f"{path}: not a PNG/JPEG file ({', '.join(IMAGE_SUFFIXES)})")
            files = [(path, path.name)]
        else:
            raise UsageError(f"input not found: {path}")
        for src, rel in files:
            if rel in seen:
                raise UsageError(f"{src} and {seen[rel]} would both be written to {out / rel}")
            seen[rel] = src
            dst = out / rel
            partner = sharp / rel if sharp is not None else None
            for other in (src, partner):
                if other is not None and dst.resolve() == other.resolve():
                    raise UsageError(f"refusing to overwrite the input {other} with its output")
            jobs.append(_Job(src, rel, dst, partner))
    return jobs


def _resolve_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, ModelInfo]:
    spec = args.model
    if spec is None:
        if DEFAULT_MODEL not in shipped_models():
            raise UsageError(
                "--model is required (no shipped weights installed): give models:/NAME/VERSION, "
                "models:/NAME/latest, models:/NAME@ALIAS, a checkpoint file (best.pt/last.pt), "
                "NAME.pt beside its NAME.json card, or a folder with config.json + weights.pt"
            )
        spec = DEFAULT_MODEL
    try:
        return load_model(spec, tracking_uri=args.tracking_uri, map_location=device)
    except WeightsError as exc:
        raise UsageError(f"--model: {exc}") from None


def _check_args(args: argparse.Namespace) -> torch.device:
    if args.tile is not None and args.tile < 16:
        raise UsageError(f"--tile must be >= 16 px, got {args.tile}")
    if args.tile_overlap < 0 or (args.tile is not None and args.tile_overlap >= args.tile):
        raise UsageError(f"--tile_overlap must be >= 0 and < --tile, got {args.tile_overlap}")
    if not args.max_memory_mb > 0:
        raise UsageError(f"--max_memory_mb must be > 0, got {args.max_memory_mb}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.align_shift < 0 or (args.align_shift and args.sharp is None):
        raise UsageError("--align_shift needs --sharp and a value >= 0")
    if args.tlc_size is not None and (args.tlc_size < 1 or not args.tlc):
        raise UsageError("--tlc_size needs --tlc and a value >= 1 px")
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch.cuda.is_available() is False")
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _progress(total: int):
    """A tqdm bar in images/s, or None when tqdm is not installed."""
    try:
        from tqdm import tqdm  # optional: only for the progress bar
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="deblur", disable=None, file=sys.stderr)


def _run_jobs(engine: _Engine, jobs: Sequence[_Job], args, report: _Report, bar) -> None:
    """Read each image, deblur equal-size runs of up to ``--batch_size`` images together (an
    image that runs in tiles alone), write and score them; failures are recorded, not raised."""
    pending: list[tuple[_Job, Image.Image, Tensor, Callable]] = []
    for job in jobs:
        try:
            img = read_image(job.src)
            xs, pack = _unpack(img)
        except _READ_ERRORS as exc:
            report.failed.append((job.rel, f"unreadable: {str(exc).splitlines()[0][:120]}"))
            _advance(bar)
            continue
        size = tuple(xs[0].shape)
        if pending and (tuple(pending[0][2].shape) != size or len(pending) >= args.batch_size):
            _finish(engine, pending, args, report, bar)
            pending = []
        pending.append((job, img, xs[0], pack))
        if engine.tiled(*size[-2:]):
            _finish(engine, pending, args, report, bar)
            pending = []
    if pending:
        _finish(engine, pending, args, report, bar)


def _advance(bar, n: int = 1) -> None:
    if bar is not None:
        bar.update(n)


def _finish(engine: _Engine, loaded: list, args, report: _Report, bar) -> None:
    """Deblur, write and score ``loaded`` (job, image, model-space tensor, pack) entries."""
    try:
        ys = engine.restore([x for _, _, x, _ in loaded])
    except NonFiniteOutputError as exc:
        report.failed.extend((job.rel, str(exc)) for job, *_ in loaded)
        _advance(bar, len(loaded))
        return
    for (job, img, x, pack), y in zip(loaded, ys, strict=True):
        _advance(bar)
        out = pack([y])
        try:
            write_image(out, job.dst, img, args.jpeg_quality)
        except OSError as exc:
            report.failed.append((job.rel, f"not written: {exc}"))
            continue
        if job.sharp is not None:
            reason = _score(job, out, x, args.align_shift, report)
            if reason is not None:
                report.failed.append((job.rel, reason))
                continue
        report.done += 1


def _score(job: _Job, out: Image.Image, x: Tensor, k: int, report: _Report) -> str | None:
    """Append the metrics row of ``job`` (restored as written vs sharp); a failure reason."""
    if not job.sharp.is_file():
        return f"no sharp image {job.sharp}"
    try:
        sharp = _metric_rgb(read_image(job.sharp))
    except _READ_ERRORS as exc:
        return f"unreadable sharp image {job.sharp}: {str(exc).splitlines()[0][:120]}"
    restored, blurred = _metric_rgb(out), denormalize(x)
    if sharp.shape != restored.shape:
        return f"size {tuple(restored.shape[1:])} differs from sharp {tuple(sharp.shape[1:])}"
    try:
        p, s, dy, dx = aligned_scores(restored, sharp, k)
        bp, bs, bdy, bdx = aligned_scores(blurred, sharp, k)
    except ValueError as exc:
        return str(exc)
    report.rows.append(
        dict(zip(CSV_COLUMNS, (job.rel, p, s, bp, bs, dy, dx, bdy, bdx), strict=True))
    )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code (0 all deblurred, 1 some failed, 2 usage error)."""
    try:
        args = build_parser().parse_args(argv)
        device = _check_args(args)
        jobs = plan_jobs(args)
        model, info = _resolve_model(args, device)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    tlc = None
    if args.tlc:
        tlc = args.tlc_size or int(1.5 * (info.train_crop_size or DEFAULT_TLC_CROP))
    opts = _options(
        model, args.tile, args.tile_overlap, args.batch_size, args.ensemble, device,
        args.max_memory_mb, None if args.amp == "auto" else args.amp == "bf16", None, tlc,
    )  # fmt: skip
    Path(args.output).mkdir(parents=True, exist_ok=True)
    report, bar = _Report(), _progress(len(jobs))
    try:
        with _Engine(model, opts) as engine:
            _run_jobs(engine, jobs, args, report, bar)
    finally:
        if bar is not None:
            bar.close()
    failed = "; ".join(f"{name} ({reason})" for name, reason in report.failed)
    print(
        f"{report.done} deblurred, {len(report.failed)} failed" + (f": {failed}" if failed else "")
    )
    if args.sharp is not None:
        _write_metrics(Path(args.output) / "metrics.csv", report.rows)
    return 1 if report.failed else 0


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    if rows:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in CSV_COLUMNS[1:5]}
        print(
            f"mean over {len(rows)} images: psnr {mean['psnr']:.2f} dB (blurred "
            f"{mean['blurred_psnr']:.2f}), ssim {mean['ssim']:.4f} (blurred "
            f"{mean['blurred_ssim']:.4f}); per image: {path}"
        )
    else:
        print(f"no image scored; {path} has the header only")


if __name__ == "__main__":
    sys.exit(main())
