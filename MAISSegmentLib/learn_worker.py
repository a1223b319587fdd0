"""The fine-tuning process of "Learn from my cases": ``python -m MAISSegmentLib.learn_worker CONFIG_JSON``.

Started by :class:`MAISSegmentLib.learn.LearnRun`; not meant to be run by hand (``mais finetune`` is the command-line
way). It reads a :class:`~MAISSegmentLib.learn.LearnConfig` from ``CONFIG_JSON`` and works in that file's folder:

- ``run/``: the :func:`~MAISSegmentLib.train.train` run (``model.pth`` at the end), ``preprocessed/``: the
  preprocessing cache of the cases, ``result.json``: the outcome (read by the parent).

Standard output carries only events, one JSON object per line (anything else the libraries print goes to standard
error)::

    {"event": "started", "train_cases": [...], "eval_cases": [...], "targets": 3, "steps": 100, "fraction": 0.0}
    {"event": "progress", "phase": "train", "done": 10, "total": 100, "fraction": 0.08, "message": "..."}
    {"event": "progress", "phase": "evaluate", "done": 1, "total": 2, "fraction": 0.9, "message": "..."}
    {"event": "finished", "fraction": 1.0, "message": "..."}
    {"event": "error", "message": "...", "type": "DataError"}

Exit status: 0 done, 2 a problem the user can fix (:class:`~MAISSegmentLib.errors.MAISError`, message in the
``error`` event), 1 an unexpected error (traceback on standard error), 3 the parent process went away.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAIN_SHARE = 0.85  # of the progress bar when cases are held aside (the rest is the before/after evaluation)


def _emitter(stream: Any) -> Callable[..., None]:
    def emit(**event: Any) -> None:
        stream.write(json.dumps(event, allow_nan=False, default=str) + "\n")
        stream.flush()

    return emit


def run(config_path: Path, emit: Callable[..., None]) -> None:
    """Fine-tune, evaluate before/after on the held-aside cases, write ``result.json`` (see the module docstring)."""
    import torch

    from .checkpoint import build_model
    from .data import PreprocessCache, list_targets, load_cases
    from .devices import resolve_device
    from .errors import ConfigError
    from .evaluate import ModelMethod, evaluate, result_document
    from .fileutil import atomic_write_text
    from .io import read_volume
    from .learn import RESULT_FILE, RUN_FOLDER, LearnConfig, split_cases
    from .train import TargetSampler, TrainConfig, train

    cfg = LearnConfig.from_json(config_path.read_text(encoding="utf-8"))
    cfg.check()
    work = config_path.parent
    parent = os.getppid()
    if cfg.nice and hasattr(os, "nice"):
        os.nice(cfg.nice)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()

    cases = load_cases(cfg.data)
    if not cases:
        raise ConfigError(f"{cfg.data} holds no cases")
    train_cases, eval_cases = split_cases(cases, cfg.holdout)
    train_targets, skipped = list_targets(train_cases)
    eval_targets, _ = list_targets(eval_cases)
    if cfg.structures:
        keys = [s.lower() for s in cfg.structures]
        train_targets = [t for t in train_targets if any(k in t.name.lower() for k in keys)]
        eval_targets = [t for t in eval_targets if any(k in t.name.lower() for k in keys)]
    if not train_targets:
        raise ConfigError(
            "the cases to learn from have no structure large enough to train on (10 mm³ at least)"
            + (f"; skipped: {skipped[0]['name']} ({skipped[0]['reason']})" if skipped else "")
        )
    notes = [f"{s['case']}: {s['name']} left out ({s['reason']})" for s in skipped]
    if eval_cases and not eval_targets:
        notes.append("the held-aside cases have no usable structure: no before/after comparison")
    share = TRAIN_SHARE if eval_targets else 1.0
    emit(
        event="started",
        train_cases=[c.id for c in train_cases],
        eval_cases=[c.id for c in eval_cases],
        targets=len(train_targets),
        steps=cfg.steps,
        device=str(device),
        fraction=0.0,
        message=f"learning from {len(train_cases)} case(s), {len(train_targets)} structure(s), on {device}",
    )

    def on_step(step: int, model: Any) -> None:
        if os.getppid() != parent:  # the application that started us is gone: stop
            raise SystemExit(3)
        done = step + 1
        emit(
            event="progress",
            phase="train",
            done=done,
            total=cfg.steps,
            fraction=share * done / cfg.steps,
            message=f"training step {done}/{cfg.steps}",
        )

    train_cfg = TrainConfig(
        mode="finetune",
        preset=None,
        init_checkpoint=str(cfg.base_checkpoint),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        episode_clicks=cfg.episode_clicks,
        tbptt=cfg.tbptt,
        memory_size=cfg.memory_size,
        loss_size=cfg.loss_size,
        checkpoint_every=max(cfg.steps, 1),
        seed=cfg.seed,
        model_id=cfg.model_id,
        version=cfg.version,
        extra={
            "learn_from_my_cases": True,
            "base_model": cfg.base_model_id or Path(cfg.base_checkpoint).name,
            "cases": [c.id for c in train_cases],
            "held_aside": [c.id for c in eval_cases],
        },
    )
    sampler = TargetSampler(train_targets, PreprocessCache(work / "preprocessed"), seed=cfg.seed)
    model = train(
        train_cfg,
        sampler,
        work / RUN_FOLDER,
        device=device,
        log=lambda text: print(text, file=sys.stderr),
        progress=False,
        on_step=on_step,
    )

    document = None
    if eval_targets:
        base = build_model(None, checkpoint=cfg.base_checkpoint, device=device)
        case_ids = list(dict.fromkeys(t.case.id for t in eval_targets))
        images = {str(t.case.image): t.case.id for t in eval_targets}

        def read(path: Path) -> Any:  # evaluate() reads each case's image once, when it starts the case
            if str(path) in images:
                done = case_ids.index(images[str(path)])
                emit(
                    event="progress",
                    phase="evaluate",
                    done=done,
                    total=len(case_ids),
                    fraction=share + (1 - share) * done / len(case_ids),
                    message=f"comparing before/after on held-aside case {done + 1}/{len(case_ids)}",
                )
            return read_volume(path)

        methods = {
            "before": ModelMethod(base, True, cfg.memory_size),
            "after": ModelMethod(model, True, cfg.memory_size),
        }
        results = evaluate(eval_targets, methods, cfg.clicks, seed=cfg.seed, read=read, progress=False)
        document = result_document(
            "learn from my cases",
            str(cfg.data),
            "held aside",
            len(case_ids),
            len(eval_targets),
            0,
            cfg.clicks,
            cfg.seed,
            results,
        )
    result = {
        "checkpoint": f"{RUN_FOLDER}/model.pth",
        "model_id": cfg.model_id,
        "version": cfg.version,
        "steps": cfg.steps,
        "train_cases": [c.id for c in train_cases],
        "eval_cases": [c.id for c in eval_cases],
        "seconds": time.perf_counter() - t0,
        "evaluation": document,
        "notes": notes,
    }
    atomic_write_text(work / RESULT_FILE, json.dumps(result, indent=1))
    emit(event="finished", fraction=1.0, message=f"fine-tuned {cfg.model_id} in {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout = sys.stderr  # library prints must not mix with the events
    emit = _emitter(events)
    if len(args) != 1:
        emit(event="error", message="usage: python -m MAISSegmentLib.learn_worker CONFIG_JSON", type="usage")
        return 2
    from .errors import MAISError, is_out_of_memory

    try:
        run(Path(args[0]), emit)
    except MAISError as exc:
        emit(event="error", message=str(exc), type=type(exc).__name__)
        print(f"learn: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    except BaseException as exc:  # reported with the traceback
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        if is_out_of_memory(exc):
            message = (
                "not enough memory to fine-tune on this machine; close other programs, use fewer or smaller cases, "
                f"or choose another device (CPU if the GPU ran out) ({message})"
            )
        emit(event="error", message=message, type=type(exc).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
