"""builders: data order and crops independent of the process count; the end-of-run figures."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from deblur_lib import artifacts
from deblur_lib.builders import GlobalBatchSampler, KeyedCrops, build_loaders
from deblur_lib.cli import TrainConfig
from deblur_lib.data import PairedImageFolder, make_loader
from deblur_lib.distributed import DistContext
from deblur_lib.models import build_model

torch.set_num_threads(2)


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


def test_build_loaders_reports_a_range_problem(tiny_data, tmp_path):
    dark = tmp_path / "dark"
    for side in ("blur", "sharp"):
        (dark / side).mkdir(parents=True)
        Image.new("RGB", (40, 40), (3, 3, 3)).save(dark / side / "a.png")
    cfg = TrainConfig(train_data=str(tiny_data / "train"), test_data=str(dark), crop_size=32)
    loaders = build_loaders(cfg, DistContext(), torch.device("cpu"))
    assert len(loaders.range_warnings) == 1 and "--test_data" in loaders.range_warnings[0]
    assert loaders.example.shape == loaders.example_sharp.shape == (1, 3, 40, 40)


def test_figures_are_pngs(tmp_path):
    history = [
        {"epoch": 0, "train_loss": 0.3, "lr": 1e-3, "val_psnr": 20.0, "val_ssim": 0.5},
        {"epoch": 1, "train_loss": 0.2, "lr": 1e-3},  # an invalid epoch: nothing logged
    ]
    arrays = artifacts.history_arrays(history)
    assert arrays["val_psnr"][0].tolist() == [0] and arrays["val_loss"][0].size == 0
    curves = artifacts.curves_png(history, tmp_path / "c.png")
    pairs = [(torch.zeros(3, 20, 30), torch.ones(3, 20, 30))] * 2
    triplets = artifacts.triplets_png(build_model("tiny"), pairs, tmp_path / "t.png")
    for path in (curves, triplets):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        artifacts.triplets_png(build_model("tiny"), [], tmp_path / "x.png")


def test_configure_backends_touches_nothing_off_cuda():
    from deblur_lib.builders import configure_backends

    flags = ("benchmark", "allow_tf32")
    before = [getattr(torch.backends.cudnn, f) for f in flags]
    before.append(torch.backends.cuda.matmul.allow_tf32)
    configure_backends(torch.device("cpu"))
    after = [getattr(torch.backends.cudnn, f) for f in flags]
    after.append(torch.backends.cuda.matmul.allow_tf32)
    assert after == before
