"""Few-shot fine-tuning experiment: does fine-tuning on k cases of a structure family help it?

For each k: fine-tune the base model on the first k training cases that contain the family (the MAIS
recipe, :mod:`MAISSegmentLib.train`), then evaluate the family's targets of the evaluation split with
the robot user, before (the base model) and after; write one JSON and a Dice-vs-clicks PNG per run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import build_model
from .data import PreprocessCache, list_targets, load_cases
from .errors import ConfigError
from .evaluate import ModelMethod, evaluate, plot_results, result_document
from .fileutil import atomic_write_text, move_aside, writable_problem
from .train import TargetSampler, TrainConfig, existing_run_files, resolve_lr_memory, train

# TrainConfig fields recorded in fewshot.json ("fewshot" part)
FEWSHOT_RECIPE_FIELDS = (
    "mode",
    "lr_encoder",
    "lr_prompt_decoder",
    "lr_memory",
    "loss_size",
    "episode_clicks",
    "batch_size",
)


RESULT_FILES = ("fewshot.json", "fewshot.png")  # what the experiment writes into its folder, besides k<N>/ runs


def _check_out_dir(out: Path, n_cases: Sequence[int], overwrite: bool) -> None:
    """Refuse an output folder that cannot be written, or holds earlier results (unless ``overwrite``)."""
    problem = writable_problem(out, folder=True)
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    found = [name for name in RESULT_FILES if (out / name).exists()]
    found += [f"k{k}/{name}" for k in n_cases for name in existing_run_files(out / f"k{k}")]
    if found and not overwrite:
        raise ConfigError(
            f"{out} already holds few-shot results ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
            "run again with --overwrite (the old files are moved into previous-<date> sub-folders) or choose "
            "another --out"
        )


def family_targets(targets: list, structures: Sequence[str]) -> list:
    """Targets whose name contains one of ``structures`` (case-insensitive)."""
    keys = [k.lower() for k in structures]
    return [t for t in targets if any(k in t.name.lower() for k in keys)]


def run_fewshot(
    base_checkpoint: str | Path,
    manifest: str | Path,
    structures: Sequence[str],
    n_cases: Sequence[int] = (1, 3),
    out_dir: str | Path = "fewshot",
    train_split: str = "train",
    eval_split: str = "test",
    clicks: Sequence[int] = (1, 5, 10),
    steps: int = 200,
    episode_clicks: int = 8,
    device: str = "cpu",
    cache_dir: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    lr_encoder: float | None = None,
    overwrite: bool = False,
    **train_options: Any,
) -> dict[str, Any]:
    """Run the experiment; returns and writes ``out_dir/fewshot.json`` (+ ``fewshot.png``).

    ``lr_encoder``: None (default) is the MAIS recipe, the image encoder frozen (``mode="finetune"``); a rate trains
    the encoder too (``mode="train"`` from the base checkpoint), for a base whose encoder was not pretrained at scale.
    ``overwrite``: run again in an ``out_dir`` that holds results (the old files are moved into ``previous-<date>``
    sub-folders); without it such a folder is refused before any work.
    ``train_options`` go to :class:`TrainConfig` (``lr_prompt_decoder``, ``lr_memory``, ``loss_size``...).

    Raises:
        ConfigError: an invalid training setting, ``out_dir`` holding results (without ``overwrite``) or not
            writable, no targets of the family, fewer training cases than a ``k``.
    """
    out = Path(out_dir)
    _check_out_dir(out, n_cases, overwrite)
    if not n_cases or min(n_cases) < 1:
        raise ConfigError(f"numbers of training cases must be >= 1, got {list(n_cases)}")
    TrainConfig(  # every setting checked before any case is read
        mode="finetune" if lr_encoder is None else "train",
        **({} if lr_encoder is None else {"lr_encoder": lr_encoder}),
        preset=None,
        steps=steps,
        episode_clicks=episode_clicks,
        seed=seed,
        **train_options,
    )
    train_t = family_targets(list_targets(load_cases(manifest, split=train_split))[0], structures)
    eval_t = family_targets(list_targets(load_cases(manifest, split=eval_split))[0], structures)
    if not train_t or not eval_t:
        raise ConfigError(f"no {'/'.join(structures)} targets in the {train_split!r} or {eval_split!r} split")
    case_order = list(dict.fromkeys(t.case.id for t in train_t))
    base = build_model(None, checkpoint=base_checkpoint, device=device)
    methods: dict[str, Any] = {"base": ModelMethod(base, True)}
    runs: dict[int, list[str]] = {}
    recipe: dict[str, Any] = {}
    for k in n_cases:
        if k > len(case_order):
            raise ConfigError(f"only {len(case_order)} training cases contain {structures}; cannot use {k}")
        keep = set(case_order[:k])
        targets = [t for t in train_t if t.case.id in keep]
        cfg = TrainConfig(
            mode="finetune" if lr_encoder is None else "train",
            **({} if lr_encoder is None else {"lr_encoder": lr_encoder}),
            preset=None,
            init_checkpoint=str(base_checkpoint),
            steps=steps,
            episode_clicks=episode_clicks,
            seed=seed,
            model_id=f"fewshot-{k}",
            checkpoint_every=max(steps, 1),
            extra={"structures": list(structures), "cases": sorted(keep)},
            **train_options,
        )
        log(f"fine-tuning on {k} case(s): {sorted(keep)}")
        model = train(
            cfg,
            TargetSampler(targets, PreprocessCache(cache_dir), seed=seed),
            out / f"k{k}",
            device=device,
            log=log,
            progress=False,
            overwrite=overwrite,
        )
        methods[f"finetuned-{k}"] = ModelMethod(model, True)
        runs[k] = sorted(keep)
    if runs:  # the runs differ only in their cases: one recipe, with the memory rate train() used
        cfg = resolve_lr_memory(cfg, base)
        recipe = {key: getattr(cfg, key) for key in FEWSHOT_RECIPE_FIELDS}
        if cfg.mode == "finetune":
            recipe["lr_encoder"] = None  # frozen
    results = evaluate(eval_t, methods, clicks, progress=False)
    doc = result_document(
        f"fewshot {structures} k={list(n_cases)}",
        str(manifest),
        eval_split,
        len({t.case.id for t in eval_t}),
        len(eval_t),
        0,
        clicks,
        seed,
        results,
    )
    doc["fewshot"] = {
        "structures": list(structures),
        "train_cases": {str(k): v for k, v in runs.items()},
        "steps": steps,
        **recipe,
    }
    if overwrite:
        move_aside(out, RESULT_FILES)
    atomic_write_text(out / "fewshot.json", json.dumps(doc, indent=1))
    plot_results(doc, out / "fewshot.png")
    for name, res in results.items():
        log(f"{name:>12}: " + "  ".join(f"Dice@{c} {res['dice_mean'][str(c)]:.3f}" for c in clicks))
    return doc
