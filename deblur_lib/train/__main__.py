"""``python -m deblur_lib.train``: the command line of ``fit``.

One flag per ``TrainConfig`` field (defaults and help from the dataclass); ``--config FILE``
reads a YAML file of ``field: value`` lines first (``params/pretrain.yaml``), and flags given
on the command line override it. Everything is
validated before a single file is created or overwritten. Exit codes: 0 normal finish, 2 usage
error (argparse-style message naming the flag to change; also a data file that passes the
header check but cannot be decoded, found during training: then the MLflow run is marked
FAILED with the file named, and last.pt holds the last finished epoch), 3 stopped by a guard
(the last line names the cause), 130 Ctrl-C, 143 SIGTERM (the MLflow run marked KILLED).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

from deblur_lib.data import DatasetError
from deblur_lib.train.config import TrainConfig, is_switch, one_line, switch_value
from deblur_lib.train.loop import Terminated, fit

EXIT_OK, EXIT_USAGE, EXIT_STOPPED = 0, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as shells report
RESUME_HINT = "MLflow run marked KILLED; last.pt holds the last finished epoch (--resume auto)"


def _parse_bool(text: str) -> bool:
    word = switch_value(text)  # the same words as a switch's true / false
    if word not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return word == "true"


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
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file of TrainConfig fields (field: value); command-line flags override it",
    )
    for f in dataclasses.fields(TrainConfig):
        base = f.type.split(" |")[0]
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(base, str)
        if " | None" in f.type:
            kind = _optional(kind)
        extra = {"nargs": "?", "const": True} if base == "bool" else {}
        if is_switch(f):  # --compile alone means true
            kind, extra = switch_value, {"nargs": "?", "const": "true"}
        parser.add_argument(
            f"--{f.name}",
            type=kind,
            default=f.default,
            help=f.metadata["help"],
            choices=f.metadata.get("choices"),
            **extra,
        )
    return parser


def _read_config(parser: argparse.ArgumentParser, path: Path) -> dict[str, object]:
    """``--config``'s YAML mapping of TrainConfig fields; a usage error (exit 2) when the file
    cannot be read or names an unknown field or a value of the wrong type."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {one_line(exc)}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of TrainConfig fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in fields:
            parser.error(f"--config {path}: unknown field {key!r} (see --help for the fields)")
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}
        kind = expected[fields[key].type.split(" |")[0]]
        optional = " | None" in fields[key].type
        if kind is str and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = str(value)  # e.g. threads: 2
        if is_switch(fields[key]):
            values[key] = value = switch_value(value)  # compile: true (unquoted YAML bool)
        wrong_bool = isinstance(value, bool) and kind is not bool
        if (value is None and not optional) or (
            value is not None and (wrong_bool or not isinstance(value, kind))
        ):
            hint = (
                f" (YAML reads on/off/yes/no unquoted as booleans: quote the word, e.g. "
                f'{key}: "off")'
                if wrong_bool
                else ""
            )
            parser.error(f"--config {path}: {key}: {value!r} is not a {fields[key].type}{hint}")
    return values


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 finished, 2 usage error, 3 stopped by a guard)."""
    parser = build_parser()
    try:
        known, _ = parser.parse_known_args(argv)
        if known.config is not None:
            parser.set_defaults(**_read_config(parser, known.config))
        args = vars(parser.parse_args(argv))
        args.pop("config")
        cfg = TrainConfig(**args)
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
        print(f"{parser.prog}: error: {one_line(exc.problem)}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:  # SIGTERM: the run is marked KILLED, last.pt kept (fit's docstring)
        print(f"{parser.prog}: terminated (SIGTERM): {RESUME_HINT}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (Ctrl-C): {RESUME_HINT}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
