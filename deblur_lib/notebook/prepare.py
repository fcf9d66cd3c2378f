"""The set-up every notebook shares: the dataset its parameters describe, created when missing.

Every notebook's ``parameters`` cell declares ``data_dir``, ``synthetic``, ``n_train``,
``n_test``, ``image_size``, ``seed`` and ``smoke``; the next cell calls :func:`prepare_data`
with them. With ``smoke`` (CI) the set is tiny and lives in ``<data_dir>-smoke``, so it is
never mixed up with the full-size one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deblur_lib.synth import synthesize

SMOKE_SIZES = {"n_train": 8, "n_test": 4, "image_size": 168}  # CI: > 160 px for stock MS-SSIM


@dataclass(frozen=True)
class NotebookData:
    """Where a notebook's pairs are: ``train_dir`` and ``test_dir`` (``{blur,sharp}/NAME.png``,
    kernels in ``kernels/``), the sizes in effect (the CI ones with ``smoke``) and the
    synthesize manifest (empty for a user's own data)."""

    train_dir: str
    test_dir: str
    n_train: int
    n_test: int
    image_size: int
    manifest: dict[str, Any] = field(default_factory=dict)


def prepare_data(
    data_dir: str,
    n_train: int,
    n_test: int,
    image_size: int,
    seed: int,
    *,
    synthetic: bool = True,
    smoke: bool = False,
) -> NotebookData:
    """The notebook's dataset: ``data_dir`` (``-smoke`` appended and CI sizes with ``smoke``),
    written by ``synth.synthesize`` when ``synthetic`` (idempotent: returns at once when the
    folder already holds this set); a user's own pairs are used as they are."""
    if smoke:
        data_dir = f"{data_dir}-smoke"
        n_train, n_test, image_size = (SMOKE_SIZES[k] for k in ("n_train", "n_test", "image_size"))
    manifest = {}
    if synthetic:
        manifest = synthesize(data_dir, n_train, n_test, size=image_size, seed=seed, progress=False)
    return NotebookData(
        f"{data_dir}/train", f"{data_dir}/test", n_train, n_test, image_size, manifest
    )
