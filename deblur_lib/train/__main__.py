"""``python -m deblur_lib.train``: the command line of ``fit``.

One flag per ``TrainConfig`` field (defaults and help from the dataclass). Everything is
validated before a single file is created or overwritten. Exit codes: 0 normal finish, 2 usage
error (argparse-style message naming the flag to change; also a data file that passes the
header check but cannot be decoded, found during training), 3 stopped by a guard (the last
line names the cause).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from deblur_lib.data import DatasetError
from deblur_lib.train.config import TrainConfig, one_line
from deblur_lib.train.loop import fit

EXIT_OK, EXIT_USAGE, EXIT_STOPPED = 0, 2, 3


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``TrainConfig`` field, defaults and help taken from the dataclass."""
    parser = argparse.ArgumentParser(
        prog="python -m deblur_lib.train",
        description="Train DeblurNet with guards (exit 0 finished, 2 usage, 3 stopped by a guard).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        base = f.type.split(" |")[0]
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(base, str)
        if " | None" in f.type:
            kind = _optional(kind)
        extra = {"nargs": "?", "const": True} if base == "bool" else {}
        parser.add_argument(
            f"--{f.name}",
            type=kind,
            default=f.default,
            help=f.metadata["help"],
            choices=f.metadata.get("choices"),
            **extra,
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 finished, 2 usage error, 3 stopped by a guard)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        cfg = TrainConfig(**vars(args))
        try:
            cfg.validate()
        except ValueError as exc:
            parser.error(one_line(exc))
    except SystemExit as exc:  # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = fit(cfg)
    except DatasetError as exc:  # a file that passed the header check but cannot be decoded
        problem = str(exc).split("\nexpected layout")[0]
        print(f"{parser.prog}: error: {one_line(problem)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if result.ok else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
