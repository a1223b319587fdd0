"""The ``mais`` command line (also ``python -m MAISSegmentLib``).

Errors a user can fix are printed as one line (``mais: error: ...``) with exit status 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, ImageError, MAISError, PromptError
from .model.config import PRESETS


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure encoder speed-up, per-click latency with/without memory, memory use")
    p.add_argument("--preset", default="sam-med3d-vit-b", choices=sorted(PRESETS), help="network size to time")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_precision(p)
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
        precision=args.precision,
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
    _add_model_choice(p, "model weights: a MAISSegment or SAM-Med3D checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unsafe unpickling of this checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_precision(p)
    p.add_argument("--out", required=True, help="output .seg.nrrd (or .nii.gz / .nrrd label map)")
    p.add_argument("--label-name", default="Segment_1", help="segment name written to the .seg.nrrd")
    p.add_argument("--no-memory", action="store_true", help="switch the MAIS memory off (no-memory baseline)")
    p.add_argument("--memory-size", type=int, default=60, help="memory bank capacity N")
    p.add_argument("--state", metavar="FILE.json", help="also save the session state (clicks + settings) here")
    p.add_argument("--resume", metavar="FILE.json", help="continue a session saved with --state")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    import time

    from .checkpoint import build_model
    from .devices import resolve_device
    from .io import read_volume
    from .markups import read_markups_points
    from .session import MAX_CLICKS, InteractiveSession, SessionOptions, parse_state

    out = Path(args.out)
    if not out.name.endswith(_SEGMENT_OUTPUTS):
        raise PromptError(f"--out {out}: use a .seg.nrrd (segmentation) or .nii.gz/.nrrd (label map) file name")
    SessionOptions(memory_size=args.memory_size)  # refuses a bank size before anything is read
    if not args.label_name.strip():
        raise PromptError("--label-name must not be empty: it is the segment's name in Slicer")
    resolve_device(args.device)
    checkpoint = _model_checkpoint(args, "no model: mais segment")
    inputs = [("--image", args.image), ("--include", args.include), ("--exclude", args.exclude)]
    inputs += [("--checkpoint", checkpoint)]
    # --state may be the --resume file (the session is saved back where it came from); --out may not.
    _check_outputs([("--out", out), ("--state", args.state)], inputs)
    _check_outputs([("--out", out)], [("--resume", args.resume)])
    state = _read_state(args.resume) if args.resume else None
    clicks: list[tuple[np.ndarray, bool]] = []
    if args.include:
        clicks += [(p, True) for p in read_markups_points(args.include, max_points=MAX_CLICKS)]
    if args.exclude:
        clicks += [(p, False) for p in read_markups_points(args.exclude, max_points=MAX_CLICKS)]
    clicks += [_parse_point(t) for t in args.point]
    if not clicks and not args.resume:
        raise PromptError("no clicks: give --include/--exclude point lists or --point R,A,S,+")
    resumed = len(parse_state(state)[1]) if state is not None else 0  # a malformed state fails here, before work
    if resumed + len(clicks) > MAX_CLICKS:
        raise PromptError(
            f"{resumed + len(clicks)} clicks given ({resumed} resumed, {len(clicks)} new); one object takes at most "
            f"{MAX_CLICKS} (each click is replayed on every update): keep the points that matter"
        )
    volume = read_volume(args.image)
    model = build_model(
        None, checkpoint=checkpoint, device=args.device, trusted=args.trust_checkpoint, precision=args.precision
    )
    print(f"model: {model.load_report.summary()}", file=sys.stderr)
    if state is not None:
        session = InteractiveSession.from_state(model, volume, state, progress=_replay_progress)
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
    _write_segment_outputs(out, args.state, volume, session, args.label_name)
    print(f"wrote {out}" + (f" and {args.state}" if args.state else ""))
    return 0


# --out endings of `mais segment`: a Slicer segmentation, else a label map
_SEGMENT_OUTPUTS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


def _replay_progress(done: int, total: int) -> None:
    """Progress of a resumed session's replay on stderr: about every tenth of a long replay."""
    if total >= 20 and (done % max(1, total // 10) == 0 or done == total):
        print(f"replaying the saved clicks: {done}/{total}", file=sys.stderr)


def _read_state(path: str) -> dict:
    """The JSON object of a ``--resume`` file (validated in full by ``InteractiveSession.from_state``)."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"--resume {path}: cannot read the session state ({exc})") from None
    if not isinstance(state, dict):
        raise PromptError(f"--resume {path}: not a session state saved with --state (a JSON object is needed)")
    return state


def _write_segment_outputs(out: Path, state_path: str | None, volume, session, label_name: str) -> None:
    """Write the mask (``--out``) and the session state (``--state``) together: both complete, or neither.

    Both go to temporary files first; only when both are written are they renamed into place (the state first: it
    holds the clicks, the user's work).
    """
    from .fileutil import atomic_write_many
    from .io import write_labelmap
    from .seg_nrrd import Segment, write_segmentation

    suffix = next(e for e in _SEGMENT_OUTPUTS if out.name.endswith(e))

    def write_mask(tmp: Path) -> None:
        if suffix == ".seg.nrrd":
            write_segmentation(tmp, volume, [Segment(label_name, session.mask, label_value=1)])
        else:
            write_labelmap(volume.with_array(session.mask.copy()), tmp)

    writes = []
    if state_path:
        text = json.dumps(session.state(), indent=1)
        writes.append((state_path, lambda tmp: tmp.write_text(text, encoding="utf-8"), ""))
    writes.append((out, write_mask, suffix))
    try:
        atomic_write_many(writes)
    except OSError as exc:
        where = f"{out} and {state_path}" if state_path else str(out)
        raise ImageError(f"cannot write {where}: {exc.strerror or exc}; nothing was written") from None


def _check_outputs(outputs: Sequence[tuple[str, object]], inputs: Sequence[tuple[str, object]] = ()) -> None:
    """Refuse, before any work, output paths that would overwrite an input or each other, or cannot be written.

    Args:
        outputs: ``(option, path)`` of the files a command writes (``None`` paths are skipped).
        inputs: ``(option, path)`` of the files it reads (``None`` skipped); compared as files on disk (symbolic
            and hard links count as the same file).

    Raises:
        ConfigError: naming both options and what to do.
    """
    from .fileutil import same_file, writable_problem

    outs = [(name, Path(str(p))) for name, p in outputs if p is not None and str(p) != ""]
    ins = [(name, Path(str(p))) for name, p in inputs if p is not None and str(p) != ""]
    for n, (name, path) in enumerate(outs):
        for in_name, in_path in ins:
            if same_file(path, in_path):
                raise ConfigError(
                    f"{name} {path} is the input {in_name}: writing it would destroy that file; "
                    "choose another output file name"
                )
        for other, other_path in outs[:n]:
            if same_file(path, other_path):
                raise ConfigError(f"{other} and {name} are the same file {path}: give them different names")
        problem = writable_problem(path)
        if problem:
            raise ConfigError(f"{name} {path}: {problem}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice vs clicks with the robot user (docs/EVALUATION.md); JSON + PNG")
    p.add_argument("--manifest", required=True, help="manifest JSON (or a folder of image/label pairs)")
    p.add_argument("--split", default=None, help="only cases of this split (e.g. test)")
    p.add_argument(
        "--methods",
        default="mais,no-memory,growcut",
        help="mais, no-memory, mais-grow-all, mais-zoom, growcut, ckpt:FILE, oracle-32, oracle-64, oracle-128 (the "
        "ceiling of an output grid, computed from the truth with no model)",
    )
    _add_model_choice(p, "weights for the mais / no-memory methods")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unsafe unpickling of the checkpoints")
    p.add_argument("--clicks", default="1,5,10,20", help="click counts at which Dice is recorded")
    p.add_argument("--strategy", default="center", choices=("center", "random"), help="robot user strategy")
    p.add_argument("--seed", type=int, default=0, help="seed of the robot user (random strategy)")
    p.add_argument("--max-targets", type=int, default=None, help="evaluate at most N targets (evenly spread)")
    p.add_argument("--memory-size", type=int, default=60, help="memory bank capacity N")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_precision(p)
    p.add_argument("--out", required=True, help="result JSON; the plot is written next to it as .png")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import build_model
    from .data import list_targets, load_cases
    from .devices import resolve_device
    from .evaluate import (
        ORACLE_METHODS,
        GrowCutMethod,
        ModelMethod,
        evaluate,
        format_tables,
        oracle_methods,
        parse_clicks,
        plot_results,
        result_document,
    )
    from .fileutil import atomic_write_many
    from .session import SessionOptions

    clicks = parse_clicks(args.clicks)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names or len(set(names)) != len(names):
        raise PromptError(f"--methods {args.methods!r}: give distinct methods, e.g. mais,no-memory,growcut")
    unknown = [n for n in names if n not in (*_EVAL_METHODS, *ORACLE_METHODS) and not n.startswith("ckpt:")]
    if unknown:
        raise PromptError(
            f"unknown method {unknown[0]!r}; use {', '.join(_EVAL_METHODS)}, ckpt:FILE or {', '.join(ORACLE_METHODS)}"
        )
    if args.max_targets is not None and args.max_targets < 1:
        raise ConfigError(f"--max-targets must be at least 1, got {args.max_targets}")
    SessionOptions(memory_size=args.memory_size)
    resolve_device(args.device)
    checkpoints = {n: n[5:] for n in names if n.startswith("ckpt:")}
    model_names = [n for n in names if n in _MODEL_METHODS]
    if model_names:
        checkpoints["base"] = _model_checkpoint(args, f"method {model_names[0]!r}")
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        raise ConfigError(f"--out {out}: give the result a .json name; the plot is written beside it as .png")
    plot = out.with_suffix(".png")
    outputs = [("--out", out), ("the plot (--out with .png)", plot)]
    _check_outputs(
        outputs, [("--manifest", args.manifest), *[(f"the checkpoint of {n}", c) for n, c in checkpoints.items()]]
    )
    cases = load_cases(args.manifest, split=args.split)
    _check_outputs(outputs, _case_files(cases))
    targets, skipped = list_targets(cases)
    if not targets:
        raise ConfigError(_no_targets_message(args.manifest, args.split, skipped))
    if args.max_targets and len(targets) > args.max_targets:
        stride = len(targets) / args.max_targets
        targets = [targets[int(i * stride)] for i in range(args.max_targets)]
    models = {
        key: build_model(
            None, checkpoint=path, device=args.device, trusted=args.trust_checkpoint, precision=args.precision
        )
        for key, path in checkpoints.items()
    }
    oracles = oracle_methods(names)
    methods: dict[str, object] = {}
    for name in names:
        if name in _MODEL_METHODS:
            methods[name] = ModelMethod(
                models["base"],
                use_memory=name != "no-memory",
                memory_size=args.memory_size,
                grow_connected=name != "mais-grow-all",
                zoom=name == "mais-zoom",
            )
        elif name == "growcut":
            methods[name] = GrowCutMethod()
        elif name in oracles:
            methods[name] = oracles[name]
        else:
            methods[name] = ModelMethod(models[name], use_memory=True, memory_size=args.memory_size)
    methods_out = evaluate(targets, methods, clicks, args.strategy, args.seed)
    command = "mais " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("mais", "__main__.py")) else " ".join(sys.argv)
    doc = result_document(
        command,
        args.manifest,
        args.split,
        len({t.case.id for t in targets}),
        len(targets),
        len(skipped),
        clicks,
        args.seed,
        methods_out,
        args.strategy,
    )
    text = json.dumps(doc, indent=1)
    try:  # the result and its plot together: both complete, or neither
        atomic_write_many(
            [
                (out, lambda tmp: tmp.write_text(text, encoding="utf-8"), ""),
                (plot, lambda tmp: plot_results(doc, tmp), ".png"),
            ]
        )
    except OSError as exc:
        raise ConfigError(f"cannot write {out} and {plot}: {exc.strerror or exc}") from None
    print(format_tables(methods_out, clicks))
    print(f"wrote {out} and {plot}")
    return 0


# evaluation methods on the --checkpoint/--model weights
_MODEL_METHODS = ("mais", "no-memory", "mais-grow-all", "mais-zoom")
_EVAL_METHODS = (*_MODEL_METHODS, "growcut")  # besides ckpt:FILE and the oracles (evaluate.ORACLE_METHODS)


def _case_files(cases: Sequence) -> list[tuple[str, Path]]:
    """``(what, path)`` of every image and label map of ``cases``: inputs no output may overwrite."""
    files = []
    for case in cases:
        files += [(f"the image of case {case.id!r}", case.image), (f"the label map of case {case.id!r}", case.label)]
    return files


def _no_targets_message(manifest: str, split: str | None, skipped: Sequence[dict]) -> str:
    """Why there is nothing to evaluate or train on, with the first skipped structure's reason."""
    where = f"{manifest}" + (f" (split {split!r})" if split else "")
    reason = f"; {len(skipped)} skipped, e.g. {skipped[0]['case']}: {skipped[0]['name']} ({skipped[0]['reason']})"
    return (
        f"no targets in {where}: no label map holds a structure of at least 10 mm^3"
        + (reason if skipped else " (the label maps are empty)")
        + "; check the label maps, --split and --structures"
    )


def _add_train(sub: argparse._SubParsersAction, name: str) -> None:
    finetune = name == "finetune"
    p = sub.add_parser(
        name,
        help=(
            "few-shot fine-tuning (encoder frozen; the MAIS paper's recipe)"
            if finetune
            else "train a model (from scratch or from a SAM-Med3D/MAISSegment checkpoint)"
        ),
    )
    p.add_argument("--manifest", required=True, help="manifest JSON (or a folder of image/label pairs)")
    p.add_argument("--split", default=None, help="cases of this split (default: train, if the cases have splits)")
    p.add_argument("--structures", default=None, help="only targets whose name contains one of these (comma list)")
    p.add_argument("--cases", type=int, default=None, help="use only the first N cases that have such targets")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, model.pth)")
    if finetune:
        _add_model_choice(p, "the model to fine-tune (a MAISSegment or SAM-Med3D checkpoint)")
    else:
        p.add_argument("--preset", default="mais-small", choices=sorted(PRESETS), help="network size")
        p.add_argument("--checkpoint", default=None, help="start from these weights (SAM-Med3D or MAISSegment)")
    p.add_argument("--steps", type=int, default=400 if finetune else 2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=2, help="global batch (episodes per step)")
    p.add_argument("--episode-clicks", type=int, default=8, help="interactions per episode")
    p.add_argument("--tbptt", type=int, default=4, help="interactions per back-propagation window")
    p.add_argument("--memory-size", type=int, default=60, help="memory bank capacity N")
    p.add_argument("--no-memory", action="store_true", help="train without the memory (baseline)")
    p.add_argument(
        "--loss-size",
        type=int,
        default=128,
        choices=(32, 64, 128),
        help="Dice loss resolution (128: reference; 32: low-res logits, cheaper on CPU)",
    )
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU (AVX512-BF16/AMX CPUs)")
    p.add_argument(
        "--targets-per-crop",
        type=int,
        default=1,
        help="episodes per crop: other labels in the crop share the encoder pass",
    )
    p.add_argument("--lr-encoder", type=float, default=8e-5, help="image encoder learning rate (train only)")
    p.add_argument("--lr-prompt-decoder", type=float, default=8e-5, help="prompt encoder + mask decoder lr")
    p.add_argument(
        "--lr-memory",
        type=float,
        default=None,
        help="memory attention learning rate (default: 8e-4 when it starts fresh, the paper's; "
        "the --lr-prompt-decoder value when the checkpoint has a trained one)",
    )
    p.add_argument(
        "--fullres",
        action="store_true",
        help="add a fresh full-resolution mask head (128^3 logits per 128^3 ROI) when the network has none",
    )
    p.add_argument(
        "--lr-fullres",
        type=float,
        default=None,
        help="full-resolution head learning rate (default: 8e-4 when it starts fresh, else --lr-prompt-decoder)",
    )
    p.add_argument(
        "--synthetic-fraction",
        type=float,
        default=0.0,
        help="share of episodes on synthetic targets grown from the images (unseen anatomy), 0-1",
    )
    p.add_argument(
        "--ct-window-prob",
        type=float,
        default=0.0,
        help="chance that a CT crop is clipped to a random soft-tissue window (robust to clipped CT), 0-1",
    )
    p.add_argument(
        "--zoom-prob",
        type=float,
        default=0.0,
        help="chance that a crop is at a finer ROI voxel size (1.0 or 0.75 mm), as zoom shows small objects, 0-1",
    )
    p.add_argument(
        "--ce-weight",
        type=float,
        default=None,
        help="add this weight of binary cross-entropy to the Dice loss (0: Dice alone; Dice gives no gradient to "
        "confidently wrong voxels; default: the starting checkpoint's recipe, else 0)",
    )
    p.add_argument(
        "--center-click-prob",
        type=float,
        default=None,
        help="chance that a correction click is the centre of the largest error component (the evaluation robot's "
        "click) instead of a uniform error voxel, 0-1 (default: the starting checkpoint's recipe, else 0)",
    )
    p.add_argument(
        "--click-loss-weight",
        type=float,
        default=None,
        help="weight of a cross-entropy term at the clicked voxels (a click must hold where it was placed; default: "
        "the starting checkpoint's recipe, else 0)",
    )
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (from scratch: ~100)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many minutes (resume later)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --out that holds a run (its files are moved into a previous-<date> sub-folder)",
    )
    p.add_argument("--cache-dir", default=None, help="preprocessing cache (default $MAIS_CACHE_DIR or ~/.cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-id", default="mais-finetuned" if finetune else "mais-custom")
    p.add_argument("--version", default="0.1.0")
    p.set_defaults(func=_cmd_train, mode=name)


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .data import PreprocessCache, list_targets, load_cases
    from .devices import resolve_device
    from .train import RUN_FILES, TargetSampler, TrainConfig, check_run_folder, train

    if args.cases is not None and args.cases < 1:
        raise ConfigError(f"--cases must be at least 1, got {args.cases}")
    if args.time_limit is not None and not args.time_limit >= 0:
        raise ConfigError(f"--time-limit must be zero or a positive number of minutes, got {args.time_limit}")
    cfg = TrainConfig(  # every setting is checked here, before any data is read or anything written
        mode="finetune" if args.mode == "finetune" else "train",
        preset=None if args.mode == "finetune" else args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        episode_clicks=args.episode_clicks,
        tbptt=args.tbptt,
        memory_size=args.memory_size,
        use_memory=not args.no_memory,
        checkpoint_every=args.checkpoint_every,
        loss_size=args.loss_size,
        cpu_bf16=args.cpu_bf16,
        targets_per_crop=args.targets_per_crop,
        lr_encoder=args.lr_encoder,
        lr_prompt_decoder=args.lr_prompt_decoder,
        lr_memory=args.lr_memory,
        fullres=args.fullres,
        lr_fullres=args.lr_fullres,
        synthetic_fraction=args.synthetic_fraction,
        ct_window_prob=args.ct_window_prob,
        zoom_prob=args.zoom_prob,
        ce_weight=args.ce_weight,
        center_click_prob=args.center_click_prob,
        click_loss_weight=args.click_loss_weight,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        model_id=args.model_id,
        version=args.version,
    )
    device = resolve_device(args.device)
    check_run_folder(args.out, args.resume, args.overwrite)
    init_checkpoint = _model_checkpoint(args, "mais finetune") if args.mode == "finetune" else args.checkpoint
    run_files = [(f"--out {name}", Path(args.out) / name) for name in RUN_FILES]
    _check_outputs(run_files, [("--manifest", args.manifest), ("--checkpoint", init_checkpoint)])
    cases = load_cases(args.manifest, split=args.split)
    _check_outputs(run_files, _case_files(cases))
    if args.split is None and any(c.split for c in cases):
        cases = [c for c in cases if c.split == "train"]
    targets, skipped = list_targets(cases)
    if args.structures:
        keys = [k.strip().lower() for k in args.structures.split(",") if k.strip()]
        targets = [t for t in targets if any(k in t.name.lower() for k in keys)]
    if args.cases:
        keep = list(dict.fromkeys(t.case.id for t in targets))[: args.cases]
        targets = [t for t in targets if t.case.id in keep]
    if not targets:
        raise ConfigError(_no_targets_message(args.manifest, args.split, skipped))
    n_cases = len({t.case.id for t in targets})
    print(f"{len(targets)} targets in {n_cases} cases", file=sys.stderr)
    cfg = dataclasses.replace(
        cfg,
        init_checkpoint=init_checkpoint,
        extra={
            "manifest": str(args.manifest),
            "split": args.split,
            "structures": args.structures,
            "cases": sorted({t.case.id for t in targets}),
            "command": "mais " + " ".join(sys.argv[1:]),
        },
    )
    sampler = TargetSampler(
        targets,
        PreprocessCache(args.cache_dir),
        seed=args.seed,
        others=args.targets_per_crop - 1,
        synthetic_fraction=cfg.synthetic_fraction,
        ct_window_prob=cfg.ct_window_prob,
        zoom_prob=cfg.zoom_prob,
    )
    train(
        cfg,
        sampler,
        args.out,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        log=lambda s: print(s, file=sys.stderr),
        time_limit_s=None if args.time_limit is None else 60 * args.time_limit,
    )
    return 0


def _add_fewshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fewshot", help="fine-tune on 1, 3... cases of a structure family; Dice before/after")
    _add_model_choice(p, "the base model")
    p.add_argument("--manifest", required=True, help="manifest JSON (or folder of image/label pairs)")
    p.add_argument("--structures", required=True, help="family: target names containing one of these (comma list)")
    p.add_argument("--cases", default="1,3", help="numbers of training cases to fine-tune on")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run")
    p.add_argument("--episode-clicks", type=int, default=8)
    p.add_argument("--clicks", default="1,5,10", help="click counts at which Dice is recorded")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--loss-size", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--cpu-bf16", action="store_true")
    p.add_argument("--lr-prompt-decoder", type=float, default=8e-5, help="prompt encoder + mask decoder lr")
    p.add_argument(
        "--lr-encoder",
        type=float,
        default=None,
        help="also train the image encoder at this lr (default: frozen, the MAIS recipe)",
    )
    p.add_argument(
        "--lr-memory",
        type=float,
        default=None,
        help="memory attention lr (default: 8e-4 if the base has none trained, else --lr-prompt-decoder)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder (fewshot.json, fewshot.png, one run folder per k)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="run again in an --out that holds results (the old files are moved into previous-<date> sub-folders)",
    )
    p.set_defaults(func=_cmd_fewshot)


def _cmd_fewshot(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .evaluate import parse_clicks
    from .fewshot import run_fewshot
    from .train import RUN_FILES

    try:
        ks = sorted({int(x) for x in args.cases.split(",")})
    except ValueError:
        raise PromptError(f"--cases {args.cases!r}: give numbers of cases like 1,3") from None
    resolve_device(args.device)
    checkpoint = _model_checkpoint(args, "mais fewshot")
    out = Path(args.out)
    outputs = [(f"--out {name}", out / name) for name in ("fewshot.json", "fewshot.png")]
    outputs += [(f"--out k{k}/{name}", out / f"k{k}" / name) for k in ks for name in RUN_FILES]
    _check_outputs(outputs, [("--manifest", args.manifest), ("--checkpoint", checkpoint)])
    run_fewshot(
        checkpoint,
        args.manifest,
        [x.strip() for x in args.structures.split(",") if x.strip()],
        ks,
        args.out,
        eval_split=args.eval_split,
        clicks=parse_clicks(args.clicks),
        steps=args.steps,
        episode_clicks=args.episode_clicks,
        device=args.device,
        loss_size=args.loss_size,
        cpu_bf16=args.cpu_bf16,
        lr_prompt_decoder=args.lr_prompt_decoder,
        lr_memory=args.lr_memory,
        lr_encoder=args.lr_encoder,
        overwrite=args.overwrite,
        log=lambda s: print(s, file=sys.stderr),
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="segment a structure of the bundled sample CT with simulated clicks (Dice, PNGs)")
    _add_model_choice(p, "model weights (default: the registry's default model)")
    p.add_argument("--structure", default=None, help="structure of the sample case (default: liver)")
    p.add_argument("--clicks", type=int, default=10, help="number of simulated clicks")
    _add_precision(p)
    p.add_argument("--out", default="mais_demo", help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unsafe unpickling of the checkpoint")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .checkpoint import build_model
    from .demo import plan_demo, run_demo
    from .devices import resolve_device

    # Everything that can be refused is refused before the model loads: clicks, --out, the structure, the files.
    plan = plan_demo(args.out, args.structure, args.clicks)
    resolve_device(args.device)
    ckpt = _model_checkpoint(args, "mais demo")
    case = plan.target.case
    inputs = [("--checkpoint", ckpt), ("the sample image", case.image), ("the sample label map", case.label)]
    _check_outputs([("--out", f) for f in plan.files], inputs)
    model = build_model(
        None, checkpoint=ckpt, device=args.device, trusted=args.trust_checkpoint, precision=args.precision
    )
    print(f"model: {model.load_report.summary()}")
    run_demo(model, args.out, plan.target.name, args.clicks)
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    """``--precision``: the network's inference precision (MAISSegmentLib.precision)."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="inference precision: auto (bfloat16 where this CPU/GPU runs it faster, measured once), float32 or "
        "bfloat16 (the MAIS_PRECISION environment variable overrides it)",
    )


def _add_model_choice(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """``--checkpoint FILE`` or ``--model ID`` (a registered/imported model); neither: the registry default."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help=checkpoint_help)
    group.add_argument(
        "--model", metavar="ID", help="a registered or imported model (see `mais weights list`) instead of --checkpoint"
    )


def _model_checkpoint(args: argparse.Namespace, what: str) -> str:
    """The weight file of ``--checkpoint``, ``--model`` or, with neither, the registry's default model."""
    from . import weights

    if args.checkpoint:
        return args.checkpoint
    model_id = args.model or weights.default_model_id()
    if model_id is None:
        raise PromptError(
            f"{what} needs --checkpoint FILE or --model ID (no default model is registered yet; "
            "see `mais weights list`)"
        )
    return str(weights.resolve(model_id))


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="model weights: list, download, import a local file, print the path",
        description="Weights are cached in $MAIS_WEIGHTS_DIR (default ~/.cache/maissegment/weights); "
        "the registry is Resources/models.json.",
    )
    wsub = p.add_subparsers(dest="weights_command", required=True)
    q = wsub.add_parser("list", help="registered and imported models and whether they are here")
    q.set_defaults(func=_cmd_weights_list)
    q = wsub.add_parser("download", help="download a registered model into the cache (checked by SHA-256)")
    q.add_argument("id", help="model id (see `mais weights list`)")
    q.add_argument("--force", action="store_true", help="download again even if a verified copy is there")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds without network activity before giving up")
    q.set_defaults(func=_cmd_weights_download)
    q = wsub.add_parser("import", help="copy a local weight file into the cache and register it (offline sites)")
    q.add_argument("file", help="a MAISSegment or SAM-Med3D checkpoint (.pth)")
    q.add_argument(
        "--id", default=None, help="model id (default: the registered model of that file name, else the name)"
    )
    q.add_argument("--replace", action="store_true", help="replace another file already imported under this id")
    q.add_argument("--trust-checkpoint", action="store_true", help="allow unsafe unpickling of this file")
    q.set_defaults(func=_cmd_weights_import)
    q = wsub.add_parser(
        "export",
        help="release a training checkpoint: weights only (no optimizer state), stored as float16 by default",
    )
    q.add_argument("checkpoint", help="training checkpoint (e.g. runs/NAME/last.pth)")
    q.add_argument("--out", required=True, help="release file to write (replaced atomically)")
    q.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32", "int8"),
        help="storage precision (int8: matrices as 8-bit rows with scales, about half the size of float16)",
    )
    q.add_argument("--id", default=None, help="model id (default: the checkpoint's)")
    q.add_argument("--version", default=None, help="model version (default: the checkpoint's)")
    q.add_argument("--provenance", default=None, help="JSON file whose entries are merged into the provenance")
    q.add_argument("--trust-checkpoint", action="store_true", help="allow unsafe unpickling of the checkpoint")
    q.set_defaults(func=_cmd_weights_export)
    q = wsub.add_parser("path", help="print the verified path of a model's weight file")
    q.add_argument("id", help="model id")
    q.set_defaults(func=_cmd_weights_path)


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from . import weights

    default = weights.default_model_id()
    rows = [("id", "version", "format", "status", "checksum", "licence")]
    for e in weights.list_models():
        rows.append(
            (
                e.id + (" (default)" if e.id == default else ""),
                e.version or "-",
                e.format or "-",
                e.status,
                e.verification_text,
                e.license or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"cache: {weights.cache_dir()}" + ("" if default else "; no default model registered yet"))
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    from . import weights

    tty = sys.stderr.isatty()
    last = [-1]

    def progress(done: int, total: int | None) -> None:
        mib = done / 2**20
        if total:
            pct = int(100 * done / total)
            step = pct if tty else pct // 10 * 10
            if step != last[0]:
                last[0] = step
                end = "\r" if tty and done < total else "\n"
                print(f"{args.id}: {pct:3d}% ({mib:.1f} of {total / 2**20:.1f} MiB)", end=end, file=sys.stderr)
        elif int(mib) // 16 != last[0]:
            last[0] = int(mib) // 16
            print(f"{args.id}: {mib:.1f} MiB", end="\r" if tty else "\n", file=sys.stderr)

    path = weights.download(args.id, progress=progress, timeout=args.timeout, force=args.force)
    if tty:
        print(file=sys.stderr)
    entry = weights.get_model(args.id)
    if not entry.sha256 and entry.local_sha256:
        print(f"SHA-256 {entry.local_sha256} (not yet in the registry: record it in models.json)", file=sys.stderr)
    print(path)
    return 0


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from . import weights

    entry = weights.import_weights(args.file, id=args.id, replace=args.replace, trusted=args.trust_checkpoint)
    for note in entry.notes:
        print(note, file=sys.stderr)
    print(f"imported {entry.id} ({entry.format}, {entry.preset or 'custom layout'}, SHA-256 {entry.local_sha256})")
    print(entry.path)
    return 0


def _cmd_weights_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_release

    extra = None
    if args.provenance:
        try:
            extra = json.loads(Path(args.provenance).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PromptError(f"--provenance {args.provenance} cannot be read as JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise PromptError(f"--provenance {args.provenance} must hold a JSON object")
    info = export_release(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        model_id=args.id,
        version=args.version,
        provenance=extra,
        trusted=args.trust_checkpoint,
    )
    print(
        f"wrote {info['path']}: {info['parameters']:,} weights as {info['dtype']}, {info['size_bytes']:,} bytes\n"
        f"file SHA-256 {info['file_sha256']} (the registry's 'sha256' and 'size_bytes')"
    )
    return 0


def _cmd_weights_path(args: argparse.Namespace) -> int:
    from . import weights

    print(weights.resolve(args.id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mais", description="MAISSegment: interactive 3-D segmentation with memory")
    parser.add_argument("--version", action="version", version=f"MAISSegment {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_segment(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    _add_fewshot(sub)
    _add_train(sub, "train")
    _add_train(sub, "finetune")
    _add_weights(sub)
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
