"""`mame-export`: a thin command line over the library (parsing and printing only).

    mame-export MODEL [options]          export, audit and check one graph (the main job)
    mame-export plan MODEL --r R         the merge plan, without exporting
    mame-export audit GRAPH.onnx         op census, forbidden ops, checker, TensorRT pre-flight
    mame-export parity GRAPH_OR_MODEL    parity of every runner against eager PyTorch
    mame-export profile MODEL --r R,...  latency of baseline / MaMe / ToMe per backend
    mame-export eval MODEL --data DIR    accuracy and fidelity of MaMe / ToMe on your images
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from mame_export.errors import UserError

# subcommand -> module in mame_export.cli exposing add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "export": "export",
    "plan": "plan",
    "audit": "audit",
    "parity": "parity",
    "profile": "profile",
    "eval": "eval",
}


def print_json(obj: Any) -> None:
    """The one JSON object a --json run writes to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    from mame_export import __version__

    parser = argparse.ArgumentParser(
        prog="mame-export",
        description="MaMe token merging -> static ONNX -> TensorRT, with parity and latency "
        "checks. `mame-export MODEL` is short for `mame-export export MODEL`.",
    )
    parser.add_argument("--version", action="version", version=f"mame-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"mame_export.cli.{module}")
        except ImportError as e:
            if getattr(e, "name", "") and e.name.startswith("mame_export.cli"):
                continue  # a subcommand not installed in this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] not in SUBCOMMANDS and not args_in[0].startswith("-"):
        args_in.insert(0, "export")
    try:
        parser = build_parser()
        args = parser.parse_args(args_in)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args))
    except UserError as e:
        print(f"mame-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mame-export: interrupted; no partial files were left behind", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, traceback on request
        if os.environ.get("MAME_EXPORT_DEBUG"):
            raise
        print(f"mame-export: internal error: {type(e).__name__}: {e} "
              "(set MAME_EXPORT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
