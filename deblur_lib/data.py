"""Paired blur/sharp image data: loading, checking, and the seeded loaders that feed training.

Spaces: `load_image` returns metric space (float32 (H, W, 3) in [0, 1]); `PairedImageFolder`
returns model space (float32 (3, H, W) in [-1, 1]). Images load upright, as a viewer shows
them: the EXIF orientation that phones write is applied (`exif_orientation`; the header checks
see the same size). Layouts (same relative names on both sides): `root/blur/**/NAME` +
`root/sharp/**/NAME`, or GoPro's `root/<seq>/blur/NAME` + `root/<seq>/sharp/NAME`
(symlinked files and folders followed, loops refused). Every input problem raises
`DatasetError` naming the file.
Training order and crops: `GlobalBatchSampler` + `KeyedCrops` (the same crops for any number
of processes and workers), or `FreshKeys` for endless generated data (never a sample twice);
`data_range_problem` checks that pixels are in model space.
The synthetic dataset itself is `deblur_lib.synth` (`synthesize` is re-exported here).

CLI: `python -m deblur_lib.data synth --out data --n_train 400 --n_test 50 --size 256 --seed 0`
and `python -m deblur_lib.data check ROOT [--full] [--crop_size N]`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from deblur_lib.synth import synthesize

__all__ = [
    "DatasetError",
    "FreshKeys",
    "GlobalBatchSampler",
    "KeyedCrops",
    "PairedImageFolder",
    "data_range_problem",
    "folder_problem",
    "image_sizes",
    "load_image",
    "make_loader",
    "synthesize",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112  # the EXIF tag phones set instead of rotating the pixels
# EXIF orientation -> the transpose that shows the stored pixels upright (as a viewer does);
# orientations 5-8 swap height and width. 1 (or a missing or unknown value): as stored.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FLAT = ("|-- blur/", "|   `-- [subdirs/]NAME.png", "`-- sharp/", "    `-- [subdirs/]NAME.png")
_LAYOUT_HEAD = "expected layout"
_FROM_WORKER = "Caught DatasetError in DataLoader worker"  # torch's re-raise from a worker
_GOPRO = ("|-- <sequence>/", "|   |-- blur/NAME.png", "|   `-- sharp/NAME.png", "`-- ...")


def _layout(root: Path | str | None) -> str:
    """The two accepted layouts as a small ASCII tree (flat left, GoPro right)."""
    top = f"{Path(root).name or root}/" if root is not None else "root/"
    rows = [(top, top), *zip(_FLAT, _GOPRO, strict=True)]
    width = max(len(left) for left, _ in rows) + 6
    lines = "\n".join(f"  {left.ljust(width)}{right}" for left, right in rows)
    return (
        f"{_LAYOUT_HEAD} (PNG/JPEG, the same relative names under blur/ and sharp/), "
        f"flat or GoPro style:\n{lines}"
    )


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and shows the expected layout.

    ``problem``: the message without the layout. Raised in a DataLoader worker, the error
    reaches the main process re-made by torch from one string, the worker's whole traceback
    ("Caught DatasetError in DataLoader worker process N. Original Traceback ..."); its
    ``problem`` is then the worker's own message again, not the traceback.
    """

    def __init__(self, problem: str, root: Path | str | None = None) -> None:
        if problem.startswith(_FROM_WORKER):
            problem = problem.rsplit(f"{DatasetError.__name__}: ", 1)[-1]
            problem = problem.split(f"\n{_LAYOUT_HEAD}", 1)[0]
        self.problem = problem
        super().__init__(f"{problem}\n{_layout(root)}")


def _list_images(folder: Path, root: Path | None = None) -> dict[str, Path]:
    """Relative posix name -> path for every PNG/JPEG under `folder` (dotfiles and dot-folders
    skipped). Symlinked files and folders are followed. Nothing is left out silently: a folder
    reached twice (a symlink loop, or two links to one folder: its images would count twice),
    a folder that cannot be listed and a broken link with an image name raise DatasetError."""

    def unlistable(err: OSError) -> None:
        raise DatasetError(f"cannot list folder {err.filename}: {err.strerror}", root)

    found: dict[str, Path] = {}
    listed: dict[Path, Path] = {}  # resolved folder -> the path it was first listed under
    for top, dirs, files in os.walk(folder, onerror=unlistable, followlinks=True):
        here = Path(top)
        real = here.resolve()
        if real in listed:
            raise DatasetError(
                f"folder {here} is {listed[real]} again (a symlink loop or a second link to "
                "one folder): its images would be listed twice; remove one link",
                root,
            )
        listed[real] = here
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # os.walk goes into these
        for name in files:
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not path.is_file():
                what = f"broken link {path} -> {os.readlink(path)}" if path.is_symlink() else ""
                raise DatasetError(what or f"{path} is not a regular file", root)
            found[path.relative_to(folder).as_posix()] = path
    return found


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened, not yet decoded image, from its header: JPEG's
    APP1 block, or PNG's eXIf chunk ahead of the pixels (where the PNG spec puts it; one after
    them is not read). 1 when there is none; an unknown value counts as 1 (as Pillow's
    ``ImageOps.exif_transpose``). Never decodes the pixels, so a header check and a full decode
    see the same orientation. Raises what Pillow raises on an unreadable EXIF block."""
    # Image.getexif, not PngImageFile's override, which decodes the pixels to find a late chunk
    value = Image.Image.getexif(img).get(EXIF_ORIENTATION, 1)
    return value if value in UPRIGHT else 1


def upright_hw(img: Image.Image) -> tuple[int, int]:
    """(H, W) of an opened image as shown upright (EXIF orientations 5-8 swap the stored
    width and height), from the header only."""
    if exif_orientation(img) in (5, 6, 7, 8):
        return img.width, img.height
    return img.height, img.width


def _decode(path: Path) -> np.ndarray:
    """Decode to (H, W, 3) uint8 or uint16, upright (the EXIF orientation applied, as a viewer
    shows it: ``exif_orientation``); 16-bit gray keeps 16 bits (Pillow reads 16-bit colour PNGs
    at 8 bits). Alpha is dropped; gray and palette images become RGB."""
    try:
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            img.load()
            if orientation in UPRIGHT:
                img = img.transpose(UPRIGHT[orientation])
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
        blur, sharp = _list_images(blur_dir, self.root), _list_images(sharp_dir, self.root)
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
    """(H, W) as shown upright (``upright_hw``), from the header; DatasetError if unreadable."""
    try:
        with Image.open(path) as img:
            return upright_hw(img)
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


class GlobalBatchSampler(Sampler):
    """Training order that does not depend on the number of processes.

    Every rank draws the same permutation of ``n`` indices from ``(seed, epoch)``, cuts it into
    global batches of ``global_batch`` (the last one completed by wrapping around, so every
    step has a full batch and ranks never get an empty one) and yields its own contiguous
    slice of each, as ``(epoch, position, index)`` keys for :class:`KeyedCrops` (``position``:
    the sample's place in the epoch, counted over all ranks). One process and N processes
    therefore see the same global batches, with the same crops.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed=0):
        if n < 1 or global_batch % world_size:
            raise ValueError(
                f"GlobalBatchSampler: need n >= 1 and a global batch divisible by the "
                f"{world_size} ranks, got n={n}, global_batch={global_batch}"
            )
        self.n, self.global_batch, self.rank, self.seed = n, global_batch, rank, seed
        self.local_batch = global_batch // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> int:
        return -(-self.n // self.global_batch)  # ceil

    def __len__(self) -> int:
        return self.steps() * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**64)
        perm = torch.randperm(self.n, generator=gen).tolist()
        for step in range(self.steps()):
            start = step * self.global_batch + self.rank * self.local_batch
            for k in range(start, start + self.local_batch):
                yield self.epoch, k, perm[k % self.n]


class KeyedCrops(Dataset):
    """``dataset[i]`` looked up by ``(epoch, position, i)``, its random crop and flips seeded by
    ``(seed, epoch, position)`` alone: the same sample gets the same crop on any rank, with any
    number of workers, and again when a resumed run replays the epoch; an image drawn twice in
    one epoch (the wrapped last batch) gets two different crops."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, i = key
        seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + position) % 2**64  # torch's range
        if get_worker_info() is None:
            self.dataset.reseed(seed)  # a private generator: the global RNG is left alone
        else:
            torch.manual_seed(seed)  # a worker process's own RNG
        return self.dataset[i]


class FreshKeys(Dataset):
    """An endless dataset (``synth.SyntheticPairs``) read by ``GlobalBatchSampler`` keys
    ``(epoch, position, i)``: the sample is number ``epoch * per_epoch + position``, so no
    sample is drawn twice in a run (``per_epoch``: positions in an epoch, all ranks), and a
    resumed run replays an epoch with the same samples, for any number of ranks or workers."""

    def __init__(self, dataset: Dataset, per_epoch: int) -> None:
        if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 1:
            raise ValueError(f"per_epoch must be an int >= 1, got {per_epoch!r}")
        self.dataset, self.per_epoch = dataset, per_epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, _ = key
        return self.dataset[epoch * self.per_epoch + position]


def data_range_problem(blur: torch.Tensor, sharp: torch.Tensor) -> str | None:
    """The data-range check (one pair, full size; a host sync: once per run, not per step).

    Model space is [-1, 1]. Values outside it (e.g. [0, 255] data) raise ValueError. Inside
    it, a range confusion cannot be told from the values with certainty, so two signs of one
    give a warning text (None when the pair looks normal): every pixel in the upper half of
    the range (metric-space [0, 1] data read as model space, or images normalised twice) and
    a pair that spans less than 1/16 of the range (8-bit values in a 16-bit file, a wrong
    divisor, a constant frame).
    """
    both = torch.stack([blur.float(), sharp.float()])
    low, high = torch.aminmax(both)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1.001 or high > 1.001:
        raise ValueError(
            f"pixel values in [{low:.4g}, {high:.4g}]: model space is [-1, 1] "
            "(normalise with x / 127.5 - 1 for 8-bit data)"
        )
    if low >= 0.0:
        return (
            f"every pixel is in [{low:.3g}, {high:.3g}], the upper half of model space [-1, 1]: "
            "[0, 1] data read as [-1, 1], or images normalised twice?"
        )
    if high - low < 2.0 / 16:
        return (
            f"the first pair spans only [{low:.3g}, {high:.3g}] of model space [-1, 1]: 8-bit "
            "values in a 16-bit file, a wrong divisor, or a constant frame?"
        )
    return None


def image_sizes(dataset) -> list[tuple[int, int]]:
    """(H, W) of every sharp image in a ``PairedImageFolder`` as loaded (upright), from file
    headers (no decoding)."""
    return [_header_hw(sharp) for _, sharp in dataset.pairs]


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be created (or written into), or None when it can. Nothing is
    left behind: a temporary folder is created in the nearest existing ancestor and removed
    (``os.access`` is not enough: it says yes to root for read-only places such as /sys)."""
    existing = Path(folder)
    while not os.path.exists(existing) and existing != existing.parent:  # no OSError raised
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deblur-probe-", dir=existing))
    except OSError as exc:
        return f"{existing} is not writable ({exc.strerror})"
    return None


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
    if args.command == "synth" and (problem := folder_problem(args.out)):
        parser.error(f"--out {args.out}: {problem}; pass another folder")
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
