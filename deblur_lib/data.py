"""Paired blur/sharp image data: loading, a synthetic dataset, and seeded loaders.

Spaces: `load_image` returns metric space (float32 (H, W, 3) in [0, 1]); `PairedImageFolder`
returns model space (float32 (3, H, W) in [-1, 1]). Layouts (same relative names on both sides):
`root/blur/**/NAME` + `root/sharp/**/NAME`, or GoPro's `root/<seq>/blur/NAME` +
`root/<seq>/sharp/NAME`. Every input problem raises `DatasetError` naming the file.

CLI: `python -m deblur_lib.data synth --out data --n_train 400 --n_test 50 --size 256 --seed 0`
and `python -m deblur_lib.data check ROOT [--full] [--crop_size N]`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_FLAT = ("|-- blur/", "|   `-- [subdirs/]NAME.png", "`-- sharp/", "    `-- [subdirs/]NAME.png")
_GOPRO = ("|-- <sequence>/", "|   |-- blur/NAME.png", "|   `-- sharp/NAME.png", "`-- ...")


def _layout(root: Path | str | None) -> str:
    """The two accepted layouts as a small ASCII tree (flat left, GoPro right)."""
    top = f"{Path(root).name or root}/" if root is not None else "root/"
    rows = [(top, top), *zip(_FLAT, _GOPRO, strict=True)]
    width = max(len(left) for left, _ in rows) + 6
    lines = "\n".join(f"  {left.ljust(width)}{right}" for left, right in rows)
    return (
        "expected layout (PNG/JPEG, the same relative names under blur/ and sharp/), "
        f"flat or GoPro style:\n{lines}"
    )


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and shows the expected layout."""

    def __init__(self, problem: str, root: Path | str | None = None) -> None:
        super().__init__(f"{problem}\n{_layout(root)}")


def _list_images(folder: Path) -> dict[str, Path]:
    """Relative posix name -> path for every PNG/JPEG under `folder` (dotfiles skipped)."""
    found = {}
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in rel.parts):
            if p.is_file():
                found[rel.as_posix()] = p
    return found


def _decode(path: Path) -> np.ndarray:
    """Decode to (H, W, 3) uint8 or uint16 (16-bit gray keeps 16 bits; Pillow reads 16-bit
    colour PNGs at 8 bits). Alpha is dropped; gray and palette images become RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(img)
            elif img.mode in ("1", "L", "LA"):
                arr = np.asarray(img.convert("L"))
            else:  # P, PA, RGBA, CMYK, YCbCr, ...: through RGBA keeps palette transparency quiet
                arr = np.asarray(img.convert("RGBA"))[..., :3]
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"unreadable or truncated image {path}: {exc}") from exc
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 1:
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DatasetError(f"unsupported pixel range in {path}: {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint16)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def load_image(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG as float32 (H, W, 3) in [0, 1] (metric space); DatasetError if unreadable."""
    arr = _decode(Path(path))
    return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)


class PairedImageFolder(Dataset):
    """Blur/sharp pairs as model-space float32 tensors (3, H, W) in [-1, 1].

    The constructor checks folders and pairing (cheap); `validate()` reads every header up
    front; decoding errors, size mismatches and crops larger than the image are also raised
    at access time. `crop_size`: the same random square crop on both images. `augment`: the
    same random horizontal flip and rot90 on both (90/270 degrees only for square images, so
    shapes stay fixed). Randomness uses torch's RNG (seeded per worker by the DataLoader;
    `make_loader` also seeds the single-process case through `reseed`). `cache=True` keeps
    decoded uint8/uint16 arrays in memory; each worker process fills its own cache unless
    `preload()` ran before the workers were forked.
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: int | None = None,
        augment: bool = False,
        cache: bool = False,
    ) -> None:
        if crop_size is not None and (
            isinstance(crop_size, bool) or not isinstance(crop_size, int)
        ):
            raise TypeError(f"crop_size must be an int or None, got {type(crop_size).__name__}")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        self.root, self.crop_size, self.augment, self.cache = Path(root), crop_size, augment, cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._generator: torch.Generator | None = None
        groups = self._find_groups()
        self.pairs: list[tuple[Path, Path]] = []
        self.names: list[str] = []
        for prefix, blur_dir, sharp_dir in groups:
            self._pair(prefix, blur_dir, sharp_dir)
        order = sorted(range(len(self.names)), key=self.names.__getitem__)
        self.names = [self.names[i] for i in order]
        self.pairs = [self.pairs[i] for i in order]

    def _find_groups(self) -> list[tuple[str, Path, Path]]:
        root = self.root
        if not root.is_dir():
            raise DatasetError(f"dataset root is not a directory: {root}", root)
        if (root / "blur").is_dir() or (root / "sharp").is_dir():
            candidates = [("", root)]
        else:
            candidates = [
                (f"{d.name}/", d)
                for d in sorted(root.iterdir())
                if d.is_dir() and ((d / "blur").is_dir() or (d / "sharp").is_dir())
            ]
            if not candidates:
                raise DatasetError(f"no blur/ and sharp/ folders under {root}", root)
        for _, base in candidates:
            for side in ("blur", "sharp"):
                if not (base / side).is_dir():
                    raise DatasetError(f"missing folder {base / side}", root)
        return [(prefix, base / "blur", base / "sharp") for prefix, base in candidates]

    def _pair(self, prefix: str, blur_dir: Path, sharp_dir: Path) -> None:
        blur, sharp = _list_images(blur_dir), _list_images(sharp_dir)
        for folder, found in ((blur_dir, blur), (sharp_dir, sharp)):
            if not found:
                raise DatasetError(f"empty folder (no PNG/JPEG images): {folder}", self.root)
        for have, other, other_dir, mine, theirs in (
            (blur, sharp, sharp_dir, "blur", "sharp"),
            (sharp, blur, blur_dir, "sharp", "blur"),
        ):
            lonely = sorted(set(have) - set(other))
            if lonely:
                shown = "; ".join(f"{have[n]} (expected {other_dir / n})" for n in lonely[:5])
                more = f" and {len(lonely) - 5} more" if len(lonely) > 5 else ""
                raise DatasetError(
                    f"{len(lonely)} {mine} image(s) without a {theirs} partner: {shown}{more}",
                    self.root,
                )
        for name in blur:
            self.names.append(prefix + name)
            self.pairs.append((blur[name], sharp[name]))

    def __len__(self) -> int:
        return len(self.pairs)

    def reseed(self, seed: int | None) -> None:
        """Use a private generator seeded with `seed` in the main process (None: global RNG)."""
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _check_sizes(self, i: int, blur_hw: tuple[int, int], sharp_hw: tuple[int, int]) -> None:
        blur_path, sharp_path = self.pairs[i]
        if blur_hw != sharp_hw:
            raise DatasetError(
                f"size mismatch: {blur_path} is {blur_hw[0]}x{blur_hw[1]} (HxW) but "
                f"{sharp_path} is {sharp_hw[0]}x{sharp_hw[1]}",
                self.root,
            )
        c = self.crop_size
        if c is not None and (blur_hw[0] < c or blur_hw[1] < c):
            raise DatasetError(
                f"crop_size {c} is larger than {blur_path} ({blur_hw[0]}x{blur_hw[1]} HxW)",
                self.root,
            )

    def validate(self, full: bool = False) -> int:
        """Check every pair up front: headers (size, readability), or full decodes if `full`
        (catches truncated files). Raises one DatasetError listing up to 10 problems."""
        problems = []
        for i, (blur_path, sharp_path) in enumerate(self.pairs):
            try:
                if full:
                    sizes = [_decode(p).shape[:2] for p in (blur_path, sharp_path)]
                else:
                    sizes = [_header_hw(p) for p in (blur_path, sharp_path)]
                self._check_sizes(i, *sizes)
            except DatasetError as exc:
                problems.append(str(exc).split("\n", 1)[0])
        if problems:
            listed = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DatasetError(f"{len(problems)} bad pair(s) in {self.root}:\n  {listed}{more}")
        return len(self.pairs)

    def preload(self) -> None:
        """Decode every pair now and keep it (turns `cache` on). Call before building a loader
        with workers: forked workers then share one copy instead of filling one cache each."""
        self.cache = True
        for i in range(len(self.pairs)):
            self._arrays(i)

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        blur, sharp = (_decode(p) for p in self.pairs[i])
        self._check_sizes(i, blur.shape[:2], sharp.shape[:2])
        if self.cache:
            self._cache[i] = (blur, sharp)
        return blur, sharp

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        blur, sharp = self._arrays(i)
        gen = self._generator if get_worker_info() is None else None
        h, w = blur.shape[:2]
        if self.crop_size is not None:
            c = self.crop_size
            top, left = (int(torch.randint(0, n - c + 1, (1,), generator=gen)) for n in (h, w))
            blur, sharp = (a[top : top + c, left : left + c] for a in (blur, sharp))
        if self.augment:
            flip, k = (int(torch.randint(0, n, (1,), generator=gen)) for n in (2, 4))
            k = k if blur.shape[0] == blur.shape[1] else k & 2  # 90/270 would change the shape
            blur, sharp = (np.rot90(a[:, ::-1] if flip else a, k) for a in (blur, sharp))
        return _to_model_space(blur), _to_model_space(sharp)


def _header_hw(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"unreadable image {path}: {exc}") from exc


def _to_model_space(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8/uint16 -> float32 (3, H, W) in [-1, 1]."""
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32)
    chw *= np.float32(2.0 / np.iinfo(arr.dtype).max)
    chw -= np.float32(1.0)
    return torch.from_numpy(chw).clamp_(-1.0, 1.0)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _SeededLoader(DataLoader):
    """A DataLoader whose single-process epochs are seeded like worker processes are:
    each `iter()` draws a seed from the loader's generator and passes it to `reseed`."""

    def __iter__(self):
        if self.num_workers == 0:
            seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            ds = self.dataset
            while ds is not None:  # walk through Subset-like wrappers
                if hasattr(ds, "reseed"):
                    ds.reseed(seed)
                ds = getattr(ds, "dataset", None)
        return super().__iter__()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A seeded DataLoader: same seed -> same order and same crops/flips, for any worker count.

    `num_workers=None`: 0 for a CPU device (the cores are busy training), else min(4, cores - 1).
    pin_memory on CUDA; persistent workers when num_workers > 0. A `sampler` needs shuffle=False.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev = torch.device(device)
    if num_workers is None:
        num_workers = 0 if dev.type == "cpu" else max(0, min(4, (os.cpu_count() or 1) - 1))
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return _SeededLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


# --- synthetic dataset ----------------------------------------------------------------------

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


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 bad data, 2 bad usage)."""
    parser = argparse.ArgumentParser(prog="python -m deblur_lib.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a synthetic blur/sharp dataset")
    synth.add_argument("--out", type=Path, default=Path("data"), help="output directory")
    synth.add_argument("--n_train", type=_int_at_least(1), default=400, help="training pairs")
    synth.add_argument("--n_test", type=_int_at_least(1), default=50, help="test pairs")
    synth.add_argument("--size", type=_int_at_least(32), default=256, help="image side, px")
    synth.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed")
    synth.add_argument("--overwrite", action="store_true", help="replace a different dataset")
    check = sub.add_parser("check", help="validate a paired folder and print the pair count")
    check.add_argument("root", type=Path)
    check.add_argument("--full", action="store_true", help="decode every image (slower)")
    check.add_argument("--crop_size", type=_int_at_least(1), default=None, help="crop to check")
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            m = synthesize(
                args.out, args.n_train, args.n_test, args.size, args.seed, overwrite=args.overwrite
            )
            print(f"{args.out}: {m['counts']['train']} train + {m['counts']['test']} test pairs")
        else:
            n = PairedImageFolder(args.root, crop_size=args.crop_size).validate(full=args.full)
            print(f"{args.root}: {n} pairs OK")
    except (DatasetError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a size larger than every shipped image
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
