"""`mame-export`: a thin command line over the library (parsing and printing only).

    mame-export MODEL [options]          export, audit and check one graph (the main job)
    mame-export plan MODEL --r R         the merge plan, without exporting
    mame-export audit GRAPH.onnx         op census, forbidden ops, checker, TensorRT pre-flight
    mame-export parity GRAPH_OR_MODEL    parity of every runner against eager PyTorch
    mame-export profile MODEL --r R,...  latency of baseline / MaMe / ToMe per backend
    mame-export eval MODEL --data DIR    accuracy and fidelity of MaMe / ToMe on your images
    mame-export tune MODEL --data DIR --target-macs R   a merge plan searched on your images
    mame-export triton SOURCE --repo DIR a Triton model repository for a graph, engine or MODEL
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

# Light imports only: torch and friends load inside main(), where Ctrl-C is caught.
from mame_export.errors import Interrupted, UserError, one_line
from mame_export.jsonsafe import json_safe

# subcommand -> module in mame_export.cli exposing add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "export": "export",
    "plan": "plan",
    "audit": "audit",
    "parity": "parity",
    "profile": "profile",
    "eval": "eval",
    "tune": "tune",
    "triton": "triton",
}


def print_json(obj: Any) -> None:
    """The one JSON object a --json run writes to stdout (strict JSON: NaN and infinity
    are written as null)."""
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad argument is a UserError like any other, not
    the usage text and the error (5 to 13 lines)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


# A value such as -inf, -1e-3 or -.5 after an option: argparse takes anything that starts
# with '-' and is not a plain negative number for an option and says "expected one argument".
_NEGATIVE_VALUE = re.compile(r"^-(?:inf(?:inity)?|nan|\d|\.\d)", re.IGNORECASE)


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _value_options(sub)
        elif action.option_strings and action.nargs != 0:
            out.update(o for o in action.option_strings if o.startswith("--"))
    return out


def _join_negative_values(args: list[str], options: set[str]) -> list[str]:
    """``--r -inf`` -> ``--r=-inf`` for options that take a value."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if a in options and i + 1 < len(args) and _NEGATIVE_VALUE.match(args[i + 1]):
            out.append(f"{a}={args[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    from mame_export import __version__

    parser = Parser(
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


# The native libraries a command loads, imported first with Ctrl-C held: an interrupt
# that lands inside their C++ initialisation aborts the process ("terminate called after
# throwing ...") instead of raising; held, it raises right after, as a clean one line.
# onnxruntime too: a SIGTERM that landed in its import was once swallowed, and the run went
# on to report "onnxruntime is not installed". Optional ones may be missing.
NATIVE = ("torch", "timm", "onnx", "onnxruntime")
OPTIONAL_NATIVE = frozenset({"onnxruntime"})


def _import_native(names: Sequence[str]) -> None:
    from mame_export.artifacts import signals_deferred

    with signals_deferred():
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:
                if name not in OPTIONAL_NATIVE:
                    raise


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _cli_environment() -> Iterator[None]:
    """For one run of main(): SIGTERM and SIGHUP interrupt like Ctrl-C (so the same
    clean-up runs), and warnings print as one line. Restored afterwards."""
    handlers: dict[int, Any] = {}
    if sys.platform != "win32":
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name)
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:  # nohup: stay immune
                    continue
                handlers[sig] = signal.signal(sig, _raise_interrupted)
    fmt = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_a, **_k: \
        f"warning: {one_line(str(message))}\n"
    try:
        yield
    finally:
        warnings.formatwarning = fmt
        for sig, h in handlers.items():
            if h is not None:
                signal.signal(sig, h)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] not in SUBCOMMANDS and not args_in[0].startswith("-"):
        args_in.insert(0, "export")
    try:
        with _cli_environment():
            parser = build_parser()
            args = parser.parse_args(_join_negative_values(args_in, _value_options(parser)))
            if args.command is None:
                parser.print_help(sys.stderr)
                return 2
            _import_native(getattr(args, "native", NATIVE))
            return int(args.run(args))
    except UserError as e:
        print(f"mame-export: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        name = e.signal_name if isinstance(e, Interrupted) else "Ctrl-C"
        print(f"mame-export: interrupted ({name}); no partial files were left behind",
              file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - a bug: one line, traceback on request
        if os.environ.get("MAME_EXPORT_DEBUG"):
            raise
        print(f"mame-export: internal error: {type(e).__name__}: {one_line(str(e))[:300]} "
              "(set MAME_EXPORT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
