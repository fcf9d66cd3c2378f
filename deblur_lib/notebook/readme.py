"""The README's pictures, drawn from what the main job and ``make pretrain`` produced.

    python -m deblur_lib.notebook.readme [--tracking_uri sqlite:///mlflow.db] [--out docs]

* ``failure_and_fix.png``: the seed's four graphs (learning rate, validation PSNR, SSIM and
  loss), read back from the MLflow runs that notebooks 01 (guards off) and 04 (guards on) made
  for each failure path: one row per path, the unguarded and the guarded run in each panel.
* ``shipped_model.png``: blurred / restored / sharp for the test photos with the best, the
  median and the worst gain, restored by the shipped weights (``DeblurNet.from_pretrained``)
  with ``predict.deblur``; PSNR under each.

Each PNG must stay under ``MAX_BYTES`` (the repository keeps them); the command says which
runs and files it used. Run it after ``make demo`` (and ``make pretrain``) in the same folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

from deblur_lib.data import PairedImageFolder
from deblur_lib.metrics import denormalize, psnr
from deblur_lib.models import DEFAULT_MODEL, DeblurNet, shipped_models
from deblur_lib.notebook.runs import RUN_NAMES, find_run, run_history
from deblur_lib.predict import deblur
from deblur_lib.train.figures import SEED_GRAPHS, figure_png, image_grid, plot_curves

MAX_BYTES = 300 * 1024
CROP_PX = 128  # px of each test image shown in shipped_model.png
EXPERIMENT = "deblur-guard-notebooks"  # where notebooks 01-04 log
PATHS = {  # row title -> (guards-off run of notebook 01, guarded run of notebook 04)
    "NaN path: one NaN pixel in a training batch": (
        RUN_NAMES["01_nan_path"],
        RUN_NAMES["04_nan_path"],
    ),
    "metric path: validation metric code raises": (
        RUN_NAMES["01_metric_path"],
        RUN_NAMES["04_metric_path"],
    ),
}


def failure_and_fix(tracking_uri: str, experiment: str = EXPERIMENT) -> Figure:
    """Two rows (the failure paths) of the seed's four graphs, guards off vs on, from MLflow;
    ValueError naming the run that is missing (run ``make demo`` first)."""
    fig = Figure(figsize=(14.4, 6.4), layout="constrained")
    for row, (title, names) in zip(fig.subfigures(len(PATHS), 1), PATHS.items(), strict=True):
        runs = {}
        for name, label in zip(names, ("guards off (notebook 01)", "guards on (notebook 04)"),
                               strict=True):  # fmt: skip
            run_id = find_run(experiment, name, tracking_uri)
            if run_id is None:
                raise ValueError(f"no finished MLflow run {name!r} in {experiment!r} at "
                                 f"{tracking_uri}: run `make demo` first")  # fmt: skip
            runs[label] = run_history(run_id, tracking_uri=tracking_uri)
        plot_curves(runs, keys=SEED_GRAPHS, into=row)
        row.suptitle(title, fontsize=11)
    return fig


def _center(image: torch.Tensor, px: int) -> torch.Tensor:
    """The central ``px`` x ``px`` of a (3, H, W) image (all of it where it is smaller)."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - px) // 2), max(0, (w - px) // 2)
    return image[..., top : top + px, left : left + px]


def shipped_row(test_dir: str | Path, name: str = DEFAULT_MODEL) -> Figure:
    """Blurred / restored (shipped weights) / sharp for three pairs of ``test_dir``: the ones
    with the best, the median and the worst gain over the blurred input (no hand-picking),
    each image captioned with its PSNR against the sharp one (of the whole image; shown: the
    central ``CROP_PX`` px, enlarged, so that the blur is visible at README size)."""
    if name not in shipped_models():
        raise ValueError(f"no shipped weights {name!r}: run `make pretrain` first")
    pairs = PairedImageFolder(test_dir)
    if len(pairs) == 0:
        raise ValueError(f"{test_dir}: no test pairs")
    model = DeblurNet.from_pretrained(name)
    rows = []
    for blur, sharp in (pairs[i] for i in range(len(pairs))):  # (3, H, W) model space
        restored = deblur(model, blur)
        sharp01 = denormalize(sharp[None])
        before, after = (psnr(denormalize(x[None]), sharp01).item() for x in (blur, restored))
        rows.append((after - before, before, after, blur, restored, sharp))
    rows.sort(key=lambda r: r[0])
    picked = {"best": rows[-1], "median": rows[len(rows) // 2], "worst": rows[0]}
    picked = {k: (*r[:3], *(_center(x, CROP_PX) for x in r[3:])) for k, r in picked.items()}
    return image_grid(
        {
            "blurred": [r[3] for r in picked.values()],
            f"restored ({name})": [r[4] for r in picked.values()],
            "sharp": [r[5] for r in picked.values()],
        },
        row_labels=[f"{k} gain: {r[0]:+.2f} dB" for k, r in picked.items()],
        captions={
            "blurred": [f"{r[1]:.2f} dB" for r in picked.values()],
            f"restored ({name})": [f"{r[2]:.2f} dB" for r in picked.values()],
        },
        size=1.8,  # inches an image: at 80 dpi the PNG stays under the README's 300 KiB
    )


def write_png(fig: Figure, path: Path, dpi: int = 80) -> Path:
    data = figure_png(fig, dpi=dpi)
    if len(data) > MAX_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes, over the {MAX_BYTES} the README allows")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    prog = "python -m deblur_lib.notebook.readme"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    ap.add_argument(  # make demo writes it; the same 60 images as make pretrain's split
        "--test_data", type=Path, default=Path("data/synth/test"), help="natural test pairs"
    )
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    try:
        written = [write_png(failure_and_fix(args.tracking_uri), args.out / "failure_and_fix.png")]
        row = shipped_row(args.test_data)
        written.append(write_png(row, args.out / "shipped_model.png"))
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
