"""The ``mais`` command line (also ``python -m MAISSegmentLib``).

Errors a user can fix are printed as one line (``mais: error: ...``) with exit status 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .errors import MAISError, PromptError
from .model.config import PRESETS


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure encoder speed-up, per-click latency with/without memory, memory use")
    p.add_argument("--preset", default="sam-med3d-vit-b", choices=sorted(PRESETS), help="network size to time")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="encoder runs per variant (median; >= 3)")
    p.add_argument("--clicks", type=int, default=20, help="timed clicks per variant (median; >= 20)")
    p.add_argument("--memory-size", type=int, default=60, help="memory bank capacity N, filled before timing")
    p.add_argument("--no-ct", action="store_true", help="skip the first-click / click-to-mask run on a 512x512x300 CT")
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
        with_ct=not args.no_ct,
    )
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
    return 0


def _parse_point(text: str) -> tuple[np.ndarray, bool]:
    """``"R,A,S,+"`` (or ``-``) -> (RAS point, include)."""
    parts = [t.strip() for t in text.split(",")]
    if len(parts) != 4 or parts[3] not in ("+", "-"):
        raise PromptError(f"--point {text!r}: write it as R,A,S,+ or R,A,S,- (RAS millimetres, include/exclude)")
    try:
        xyz = np.array([float(x) for x in parts[:3]])
    except ValueError:
        raise PromptError(f"--point {text!r}: coordinates must be numbers") from None
    return xyz, parts[3] == "+"


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment one structure from include/exclude clicks and write a .seg.nrrd",
        description="Clicks are applied in order: the --include file's points, then the --exclude file's, then "
        "each --point as given. Markups files may be in LPS or RAS (their coordinateSystem is honoured).",
    )
    p.add_argument("--image", required=True, help="NIfTI/NRRD/MetaImage file or DICOM series folder")
    p.add_argument("--include", metavar="FILE.mrk.json", help="Slicer point list of include (+) clicks")
    p.add_argument("--exclude", metavar="FILE.mrk.json", help="Slicer point list of exclude (-) clicks")
    p.add_argument("--point", action="append", default=[], metavar="R,A,S,+|-", help="a click in RAS mm (repeatable)")
    p.add_argument("--checkpoint", help="model weights: a MAISSegment or SAM-Med3D checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unsafe unpickling of this checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", required=True, help="output .seg.nrrd (or .nii.gz / .nrrd label map)")
    p.add_argument("--label-name", default="Segment_1", help="segment name written to the .seg.nrrd")
    p.add_argument("--no-memory", action="store_true", help="switch the MAIS memory off (no-memory baseline)")
    p.add_argument("--memory-size", type=int, default=60, help="memory bank capacity N")
    p.add_argument("--state", metavar="FILE.json", help="also save the session state (clicks + settings) here")
    p.add_argument("--resume", metavar="FILE.json", help="continue a session saved with --state")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    import json
    import time

    from .checkpoint import build_model
    from .io import Segment, read_volume, write_labelmap, write_segmentation
    from .markups import read_markups_points
    from .session import InteractiveSession, SessionOptions

    out = Path(args.out)
    if not out.name.endswith((".seg.nrrd", ".nii.gz", ".nii", ".nrrd")):
        raise PromptError(f"--out {out}: use a .seg.nrrd (segmentation) or .nii.gz/.nrrd (label map) file name")
    clicks: list[tuple[np.ndarray, bool]] = []
    if args.include:
        clicks += [(p, True) for p in read_markups_points(args.include)]
    if args.exclude:
        clicks += [(p, False) for p in read_markups_points(args.exclude)]
    clicks += [_parse_point(t) for t in args.point]
    if not clicks and not args.resume:
        raise PromptError("no clicks: give --include/--exclude point lists or --point R,A,S,+")
    if not args.checkpoint:
        raise PromptError("no model: pass --checkpoint FILE (a MAISSegment or SAM-Med3D checkpoint)")
    volume = read_volume(args.image)
    model = build_model(None, checkpoint=args.checkpoint, device=args.device, trusted=args.trust_checkpoint)
    print(f"model: {model.load_report.summary()}", file=sys.stderr)
    if args.resume:
        try:
            state = json.loads(Path(args.resume).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PromptError(f"--resume {args.resume}: cannot read the session state ({exc})") from None
        session = InteractiveSession.from_state(model, volume, state)
        print(f"resumed {len(session.clicks)} click(s) from {args.resume}", file=sys.stderr)
    else:
        options = SessionOptions(use_memory=not args.no_memory and model.has_memory, memory_size=args.memory_size)
        session = InteractiveSession(model, options)
        session.set_image(volume)
    for n, (point, include) in enumerate(clicks, start=len(session.clicks) + 1):
        t0 = time.perf_counter()
        session.add_click(point, include)
        dt = time.perf_counter() - t0
        tm = session.last_timings
        print(
            f"click {n} ({'+' if include else '-'}) at RAS {np.round(point, 1).tolist()}: {dt:.3f} s "
            f"(encoder {tm['encoder']:.3f}, network {tm['decoder']:.3f}, resample {tm['resample']:.3f}); "
            f"{int(session.mask.sum())} voxels"
        )
    mask_volume = volume.with_array(session.mask.copy())
    if out.name.endswith(".seg.nrrd"):
        write_segmentation(out, volume, [Segment(args.label_name, session.mask, label_value=1)])
    else:
        write_labelmap(mask_volume, out)
    if args.state:
        _write_text_atomic(Path(args.state), json.dumps(session.state(), indent=1))
    print(f"wrote {out}" + (f" and {args.state}" if args.state else ""))
    return 0


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mais", description="MAISSegment: interactive 3-D segmentation with memory")
    parser.add_argument("--version", action="version", version=f"MAISSegment {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_segment(sub)
    return parser


def _glue_points(argv: list[str]) -> list[str]:
    """``--point -30,15,0,-`` -> ``--point=-30,15,0,-`` (argparse would take the value for an option)."""
    out: list[str] = []
    it = iter(argv)
    for tok in it:
        if tok == "--point":
            nxt = next(it, None)
            out.append(tok if nxt is None else f"--point={nxt}")
        else:
            out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_glue_points(list(sys.argv[1:] if argv is None else argv)))
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
