"""A synthetic paired deblurring dataset from natural images that installed packages ship.

Sharp images are random crops, scales and flips of scikit-image's and matplotlib's sample
images; blur is a random camera-shake kernel (a random-walk trajectory with inertia, in the
spirit of Boracchi & Foi 2012) plus light Gaussian noise. Kernels are saved beside the pairs
for classical non-blind baselines. Same seed -> byte-identical files.
Re-exported by `deblur_lib.data`; the CLI is `python -m deblur_lib.data synth ...`.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_SKIMAGE_NAMES = (
    "astronaut brick camera chelsea coffee coins grass gravel hubble_deep_field "
    "immunohistochemistry moon page rocket text"
).split()
_MPL_NAMES = ("grace_hopper.jpg",)
_TEST_SOURCES = ("skimage.data.camera", "skimage.data.coffee", "skimage.data.gravel")
_SYNTH_FORMAT = 1
NOISE_SIGMA = 0.01  # Gaussian noise std added to the blurred image, metric space


@functools.lru_cache(maxsize=4)
def _natural_images(min_side: int) -> dict[str, np.ndarray]:
    """Offline natural images shipped by scikit-image and matplotlib, uint8 (H, W) or (H, W, 3),
    with min(H, W) >= min_side; name -> array, sorted by name."""
    import skimage.data
    from matplotlib.cbook import get_sample_data

    found = {}
    for name in _SKIMAGE_NAMES:
        loader = getattr(skimage.data, name, None)
        try:  # images not in the wheel need pooch and a network: skip them
            found[f"skimage.data.{name}"] = np.asarray(loader()) if loader else None
        except (ImportError, OSError, ValueError):
            continue
    for name in _MPL_NAMES:
        try:
            with Image.open(get_sample_data(name, asfileobj=False)) as img:
                found[f"matplotlib:{name}"] = np.asarray(img.convert("RGB"))
        except (OSError, ValueError):
            continue
    return {
        n: a[..., :3] if a.ndim == 3 else a
        for n, a in sorted(found.items())
        if a is not None and a.dtype == np.uint8 and min(a.shape[:2]) >= min_side
    }


def random_shake_kernel(size: int, rng: np.random.Generator) -> np.ndarray:
    """Random camera-shake PSF: float32 (size, size), >= 0, sums to 1, centroid at the centre.

    Trajectory as in Boracchi & Foi (2012), "Modeling the performance of image restoration
    from motion blur": a constant-speed random walk with inertia, a centripetal pull and
    occasional abrupt shakes (2000 steps, their parameter ranges), cut to a random exposure
    fraction, scaled to span 60-100% of the support and splatted bilinearly (subpixel).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd int >= 3, got {size!r}")
    n, length = 2000, 60.0
    anxiety, centripetal = 0.1 * rng.random(), 0.7 * rng.random()
    gauss, big_shake, angle = 10.0 * rng.random(), 0.2 * rng.random(), 2 * np.pi * rng.random()
    u, a = rng.random(n).tolist(), rng.random(n).tolist()
    gx, gy = rng.standard_normal(n).tolist(), rng.standard_normal(n).tolist()
    step = length / (n - 1)
    vx, vy = np.cos(angle) * step, np.sin(angle) * step
    x = y = 0.0
    xs, ys = [0.0] * n, [0.0] * n
    for t in range(n - 1):  # plain floats: ~1 ms per kernel
        dx = anxiety * (gauss * gx[t] - centripetal * x) * step
        dy = anxiety * (gauss * gy[t] - centripetal * y) * step
        if u[t] < big_shake * anxiety:  # abrupt shake: turn back by ~180 degrees
            c, s = np.cos(np.pi + a[t] - 0.5), np.sin(np.pi + a[t] - 0.5)
            dx, dy = dx + 2 * (vx * c - vy * s), dy + 2 * (vx * s + vy * c)
        vx, vy = vx + dx, vy + dy
        norm = (vx * vx + vy * vy) ** 0.5 / step
        vx, vy = vx / norm, vy / norm
        x, y = x + vx, y + vy
        xs[t + 1], ys[t + 1] = x, y
    keep = max(2, int(n * rng.uniform(0.25, 1.0)))  # exposure fraction
    px, py = np.asarray(xs[:keep]), np.asarray(ys[:keep])
    px, py = px - px.mean(), py - py.mean()
    radius = max(np.abs(px).max(), np.abs(py).max())
    scale = rng.uniform(0.6, 1.0) * (size - 3) / 2 / radius if radius > 0 else 0.0
    px, py = px * scale + (size - 1) / 2, py * scale + (size - 1) / 2
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    kernel = np.zeros(size * size)
    for ox, oy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy)):
        kernel += np.bincount((y0 + oy) * size + x0 + ox, weights=w, minlength=size * size)
    kernel += np.bincount((y0 + 1) * size + x0 + 1, weights=fx * fy, minlength=size * size)
    return (kernel / kernel.sum()).reshape(size, size).astype(np.float32)


def _blur(sharp: np.ndarray, kernel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) (*) kernel, reflect padding, 'same' size, + noise -> uint8 (H, W, 3)."""
    from scipy.signal import fftconvolve

    r = kernel.shape[0] // 2
    padded = np.pad(sharp.astype(np.float32) / 255, ((r, r), (r, r), (0, 0)), mode="reflect")
    out = fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))  # float32: 2x faster
    out += rng.normal(0.0, NOISE_SIGMA, out.shape).astype(np.float32)
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def _sample_pair(
    sources: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Random crop (side size..2*size, resized to size), flip, shake kernel, blur."""
    name = list(sources)[int(rng.integers(len(sources)))]
    src = sources[name]
    h, w = src.shape[:2]
    side = int(rng.integers(size, min(h, w, 2 * size) + 1))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    patch = src[top : top + side, left : left + side]
    if side != size:
        patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.LANCZOS))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    sharp = np.ascontiguousarray(np.repeat(patch[:, :, None], 3, 2) if patch.ndim == 2 else patch)
    kmax = min(31, size // 2) - (1 - min(31, size // 2) % 2)  # largest odd <= min(31, size/2)
    kernel = random_shake_kernel(2 * int(rng.integers(3, kmax // 2 + 1)) + 1, rng)
    return name, sharp, _blur(sharp, kernel, rng), kernel


def synthesize(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    size: int = 256,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic paired dataset; returns the manifest (also `out_dir/manifest.json`).

    Files: `out_dir/{train,test}/{blur,sharp}/NNNN.png` (8-bit RGB, size x size) and
    `out_dir/{train,test}/kernels/NNNN.npy` (float32 PSF, odd side 7..31, sums to 1). Sharp
    images are crops of natural images shipped by scikit-image/matplotlib; test images come
    from held-out source images (`_TEST_SOURCES`) when others remain for training. Image i
    of a split depends only on (seed, split, i): the same seed gives byte-identical files.
    Idempotent: a complete manifest with the same settings returns at once. A non-empty
    `out_dir` written otherwise raises FileExistsError unless `overwrite` (then its
    train/, test/ and manifest.json are replaced; other files are left alone).
    """
    checks = (("n_train", n_train, 1), ("n_test", n_test, 1), ("size", size, 32), ("seed", seed, 0))
    for key, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
    out = Path(out_dir)
    settings = {
        "format": _SYNTH_FORMAT,
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
        "seed": seed,
        "noise_sigma": NOISE_SIGMA,
    }
    manifest_path = out / "manifest.json"
    old = _read_manifest(manifest_path)
    counts = (("train", n_train), ("test", n_test))
    if old is not None and old.get("settings") == settings and old.get("complete"):
        if all(len(list((out / s / "blur").glob("*.png"))) == n for s, n in counts):
            return old
    foreign = old is None or old.get("settings") != settings
    if out.is_dir() and any(out.iterdir()) and foreign and not overwrite:
        raise FileExistsError(
            f"{out} is not empty and was not written by synthesize() with {settings} "
            f"(found manifest: {old.get('settings') if old else None}); "
            "pass overwrite=True (CLI: --overwrite) or choose another directory"
        )
    sources = _natural_images(size)
    if not sources:
        raise ValueError(f"size {size} is larger than every shipped natural image")
    for part in ("train", "test"):
        shutil.rmtree(out / part, ignore_errors=True)
    test_src = {n: a for n, a in sources.items() if n in _TEST_SOURCES}
    train_src = {n: a for n, a in sources.items() if n not in _TEST_SOURCES}
    if not test_src or not train_src:
        test_src = train_src = sources
    manifest = {
        "settings": settings,
        "complete": False,
        "counts": {"train": n_train, "test": n_test},
        "sources": {"train": list(train_src), "test": list(test_src)},
        "used": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(manifest_path, manifest)
    from tqdm.auto import tqdm

    digits = max(4, len(str(max(n_train, n_test) - 1)))
    with tqdm(total=n_train + n_test, desc="synthesize", disable=not progress) as bar:
        for split_id, (split, n, src) in enumerate(
            (("train", n_train, train_src), ("test", n_test, test_src))
        ):
            for sub in ("blur", "sharp", "kernels"):
                (out / split / sub).mkdir(parents=True, exist_ok=True)
            used: dict[str, int] = {}
            for i in range(n):
                name, sharp, blur, kernel = _sample_pair(
                    src, size, np.random.default_rng([seed, split_id, i])
                )
                stem = f"{i:0{digits}d}"
                Image.fromarray(sharp).save(out / split / "sharp" / f"{stem}.png", compress_level=1)
                Image.fromarray(blur).save(out / split / "blur" / f"{stem}.png", compress_level=1)
                np.save(out / split / "kernels" / f"{stem}.npy", kernel)
                used[name] = used.get(name, 0) + 1
                bar.update(1)
            manifest["used"][split] = dict(sorted(used.items()))
    manifest["complete"] = True
    _write_manifest(manifest_path, manifest)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# --- CLI ------------------------------------------------------------------------------------
