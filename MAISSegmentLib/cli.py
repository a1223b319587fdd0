"""The ``mais`` command line (also ``python -m MAISSegmentLib``).

Errors a user can fix are printed as one line (``mais: error: ...``) with exit status 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import MAISError
from .model.config import PRESETS


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure encoder speed-up, per-click latency with/without memory, memory use")
    p.add_argument("--preset", default="sam-med3d-vit-b", choices=sorted(PRESETS), help="network size to time")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="encoder runs per variant (median; >= 3)")
    p.add_argument("--clicks", type=int, default=20, help="timed clicks per variant (median; >= 20)")
    p.add_argument("--memory-size", type=int, default=60, help="memory bank capacity N, filled before timing")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench, write_json

    if args.repeats < 1 or args.clicks < 1 or args.memory_size < 1:
        raise MAISError("--repeats, --clicks and --memory-size must be at least 1")
    res = run_bench(
        args.preset,
        args.device,
        args.threads,
        args.repeats,
        args.clicks,
        args.memory_size,
        log=lambda s: print(s, file=sys.stderr),
    )
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mais", description="MAISSegment: interactive 3-D segmentation with memory")
    parser.add_argument("--version", action="version", version=f"MAISSegment {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MAISError as exc:
        if args.debug:
            raise
        print(f"mais: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mais: interrupted", file=sys.stderr)
        return 130
