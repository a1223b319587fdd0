"""Strict, safe checkpoint loading and saving; ``build_model``.

Two formats are read:

* **SAM-Med3D** (e.g. ``sam_med3d_turbo.pth``): a dict with the weights under ``model_state_dict`` (plus
  ``epoch``, optimizer/scheduler state, ``args`` as an ``argparse.Namespace``...) or a plain state dict.
  The memory attention is not in it and starts fresh (``LoadReport.memory_attention == "fresh"``).
* **MAISSegment** (written by :func:`save_checkpoint`): ``format``, ``format_version``, ``model_id``,
  ``version``, ``config`` (``ModelConfig.to_dict()``), ``state_dict`` (including the memory attention),
  ``provenance`` (training recipe, data, command) and ``sha256`` of the weights' content.

Loading is ``torch.load(weights_only=True)`` with a short allow-list of plain-data classes that training
scripts put in checkpoints (``argparse.Namespace``, ``collections.Counter`` from ``MultiStepLR``, NumPy
scalars, paths). Anything else needs ``trusted=True``, which the user must ask for explicitly. Every key
and shape is checked *before* any weight is copied, so a bad file never leaves a half-loaded model.

A configuration read from a file is not trusted either: its fields are type- and range-checked, it must
describe the tensors actually in the file (:func:`check_config_matches_weights`), and the network it
describes must fit in the available memory (:func:`check_fits_in_memory`), all before anything is built.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib
import math
import os
import pathlib
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .devices import resolve_device
from .errors import CheckpointError, ConfigError, UntrustedCheckpointError
from .fileutil import atomic_write
from .model.config import (
    FullResConfig,
    ImageEncoderConfig,
    MaskDecoderConfig,
    MemoryConfig,
    ModelConfig,
    PromptEncoderConfig,
    get_preset,
)
from .model.fullres_head import FULLRES_PREFIX, FullResHead
from .model.mais import MEMORY_PREFIX, MAISModel
from .model.memory_attention import MemoryAttention
from .precision import check_precision, set_inference_precision
from .quantize import dequantise_state_dict, quantise_state_dict
from .sysinfo import available_memory_bytes

FORMAT = "maissegment-checkpoint"
FORMAT_VERSION = 1
# A legacy (pre-zip, ``_use_new_zipfile_serialization=False``) torch file starts with a pickle (protocol 2-5) of
# torch's magic number: this long opcode appears within its first bytes. Anything neither zip nor this is not a
# PyTorch checkpoint, whatever its first byte.
_LEGACY_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_HEAD_BYTES = 32
# Bounds of a stored configuration: every integer field lies in [1, _MAX_CONFIG_INT] (these may be 0), so that
# even a meta-device sketch of the network has sane shapes. 2^24 is far above any real width or depth.
_MAX_CONFIG_INT = 1 << 24
_ZERO_ALLOWED = {"window_size", "num_multimask_outputs"}
_CONFIG_SECTIONS = {
    "image_encoder": ImageEncoderConfig,
    "prompt_encoder": PromptEncoderConfig,
    "mask_decoder": MaskDecoderConfig,
    "memory": MemoryConfig,
    "fullres": FullResConfig,
}
_OPTIONAL_SECTIONS = ("memory", "fullres")  # may be null: the part is absent
_OPTIONAL_PREFIXES = (MEMORY_PREFIX, FULLRES_PREFIX)  # parts that may be missing from a file (they start fresh)


# NumPy scalars (``np.float64(0.7)``) pickle as ``<numpy core>.multiarray.scalar``: ``numpy.core`` when the
# file was written with NumPy 1.x, ``numpy._core`` with NumPy 2.x. Both names must be accepted whichever
# NumPy is installed, or an older SAM-Med3D checkpoint would need ``trusted=True``. (``np._core`` first:
# touching ``np.core`` warns under NumPy 2.)
def _numpy_scalar() -> Any:
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(name).scalar
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy.core.multiarray.scalar not found")


_NP_SCALAR = _numpy_scalar()
# torch >= 2.6 accepts ``(object, "module.name")`` pairs, which map a pickled name onto an object.
_ALIASES = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)

# Plain-data classes found in real training checkpoints; reconstructing them runs no user code.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    collections.Counter,
    collections.defaultdict,
    pathlib.PurePosixPath,
    pathlib.PosixPath,
    pathlib.PureWindowsPath,
    pathlib.WindowsPath,
    np.dtype,
    *(
        [(_NP_SCALAR, "numpy.core.multiarray.scalar"), (_NP_SCALAR, "numpy._core.multiarray.scalar")]
        if _ALIASES
        else [_NP_SCALAR]
    ),
    *[getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")],
]


@dataclass
class LoadReport:
    """What :func:`build_model` loaded.

    Attributes:
        source: ``"sam-med3d"``, ``"maissegment"`` or ``"none"`` (random weights).
        path: the checkpoint file, if any.
        model_id, version: from a MAISSegment checkpoint.
        memory_attention: ``"loaded"``, ``"fresh"`` (randomly initialised, untrained) or ``"absent"``.
        fullres_head: the full-resolution mask path, likewise (``"fresh"`` outputs the decoder's logits upsampled).
        sha256: content hash of the loaded weights (MAISSegment format).
        notes: anything the user should know (stripped prefixes, inferred configuration...).
    """

    source: str
    path: str | None = None
    model_id: str | None = None
    version: str | None = None
    memory_attention: str = "fresh"
    fullres_head: str = "absent"
    sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = self.model_id or self.source
        return f"{what} ({self.source}, memory attention {self.memory_attention})"


# --------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> Any:
    """Unpickle a checkpoint file safely.

    Args:
        path: the file.
        trusted: allow full unpickling if the safe loader refuses (only for files the user trusts:
            unpickling can run arbitrary code).

    Raises:
        CheckpointError: missing, empty, truncated or not a PyTorch file.
        UntrustedCheckpointError: the file needs classes outside the allow-list and ``trusted`` is False.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a folder, not a weight file")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes); download or copy it again")
    with open(p, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    if not zipfile.is_zipfile(p):
        if head.startswith(b"PK"):
            raise CheckpointError(f"checkpoint {p} is truncated or corrupt ({size} bytes); download or copy it again")
        if not _is_legacy_torch_file(head):
            kind = _guess_kind(head)
            raise CheckpointError(
                f"{p} is not a PyTorch checkpoint at all ({kind}: neither a zip archive nor a pickled torch file); "
                "pick the .pth/.pt weight file"
            )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if trusted:
            return _load_trusted(p)
        unsafe = _unsafe_globals(p)
        if not unsafe:  # refused for another reason than its classes: the pickle itself is damaged
            raise CheckpointError(
                f"checkpoint {p} is damaged: its content cannot be read as weights ({_unpickler_detail(exc)}); "
                "download or copy it again"
            ) from None
        raise UntrustedCheckpointError(
            f"checkpoint {p} contains Python objects that are not plain data ({', '.join(unsafe[:5])}). Loading it "
            "could run code; if you trust where it came from, load it again with trusted=True "
            "(CLI: --trust-checkpoint)"
        ) from None
    except Exception as exc:  # damaged data can make the weights-only unpickler fail in any way
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt ({_first_line(exc)}); download or copy it again"
        ) from None


def _is_legacy_torch_file(head: bytes) -> bool:
    """Whether the first bytes of a (non-zip) file are those of a legacy ``torch.save``: a pickle whose first
    object is torch's magic number."""
    return head.startswith(b"\x80") and _LEGACY_MAGIC in head


def _unsafe_globals(p: pathlib.Path) -> list[str]:
    """The classes/functions a checkpoint's pickle needs beyond the allow-list ([] when it cannot tell)."""
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(p) if not _allowed(g)]
    except Exception:  # a damaged file: nothing to report
        return []


def _unpickler_detail(exc: BaseException) -> str:
    """What torch's weights-only unpickler actually objected to (e.g. ``Unsupported operand 205``), without the
    surrounding advice to retry with ``weights_only=False`` (wrong for a damaged file)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        if lines:
            return lines[0][:200]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _load_trusted(p: pathlib.Path) -> Any:
    """Full unpickling (the user trusts the file); any failure is a :class:`CheckpointError`."""
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {p} needs Python code that is not available here ({exc}); it is probably a whole "
            "pickled model rather than weights. Save its state_dict() in the environment that wrote it"
        ) from None
    except Exception as exc:  # unpickling arbitrary objects can fail in any way
        raise CheckpointError(
            f"checkpoint {p} could not be unpickled ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


def _allowed(global_name: str) -> bool:
    return any(
        (g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}") == global_name for g in SAFE_GLOBALS
    )


def _guess_kind(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file, e.g. a .nii.gz image"
    if head.startswith(b"NRRD"):
        return "an NRRD image"
    if head[:1] in (b"{", b"["):
        return "a JSON/text file"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "unknown binary content"


def split_checkpoint(obj: Any) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Identify the format of an unpickled checkpoint.

    Returns:
        ``(source, state_dict, metadata)`` with source ``"maissegment"`` or ``"sam-med3d"``.

    Raises:
        CheckpointError: no weights in it, or a 2-D SAM checkpoint.
    """
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if not isinstance(obj.get("format_version", 0), int):
            raise CheckpointError(f"checkpoint format version {obj.get('format_version')!r} is not a number; corrupt?")
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {obj.get('format_version')} is newer than this MAISSegment "
                f"understands ({FORMAT_VERSION}); update MAISSegment"
            )
        sd, meta, source = obj.get("state_dict"), obj, "maissegment"
        if obj.get("storage_dtype") == "int8" and isinstance(sd, dict):
            sd = dequantise_state_dict(sd, obj.get("quant_scales"))
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k != "model_state_dict"}
        sd, source = obj["model_state_dict"], "sam-med3d"
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, meta, source = obj, {}, "sam-med3d"
    else:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"no model weights found in the checkpoint (top-level content: {keys})")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("the checkpoint's weights are not a dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
        meta = {**meta, "_note": "removed the 'module.' prefix of a DistributedDataParallel save"}
    pe = sd.get("image_encoder.patch_embed.proj.weight")
    if pe is not None and pe.ndim == 4:
        raise CheckpointError(
            "this is a 2-D SAM checkpoint (its patch embedding is a 2-D convolution "
            f"{tuple(pe.shape)}); MAISSegment needs a 3-D SAM-Med3D checkpoint such as sam_med3d_turbo.pth"
        )
    return source, sd, meta


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of weights: names, dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def infer_config(
    sd: dict[str, torch.Tensor], memory: MemoryConfig | None = None, fullres: FullResConfig | None = None
) -> ModelConfig:
    """Read the backbone configuration off a SAM-Med3D-layout state dict (shapes only); ``memory`` and
    ``fullres`` (the parts SAM-Med3D does not have) are taken as given.

    Raises:
        CheckpointError: not a SAM-Med3D layout.
    """
    try:
        pe = sd["image_encoder.patch_embed.proj.weight"]  # (C, in, p, p, p)
        pos = sd["image_encoder.pos_embed"]  # (1, G, G, G, C)
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("image_encoder.blocks."))
        rel = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_d"].shape for i in range(depth)]
        grid = pos.shape[1]
        head_dim = rel[0][1]
        sizes = [(r[0] + 1) // 2 for r in rel]
        window = max(sizes)
        enc = ImageEncoderConfig(
            img_size=grid * pe.shape[2],
            patch_size=pe.shape[2],
            in_chans=pe.shape[1],
            embed_dim=pe.shape[0],
            depth=depth,
            num_heads=pe.shape[0] // head_dim,
            mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / pe.shape[0],
            window_size=window if window > grid else 0,
            global_attn_indexes=tuple(i for i, s in enumerate(sizes) if s == grid and window > grid),
            out_chans=sd["image_encoder.neck.0.weight"].shape[0],
        )
        n_masks = sd["mask_decoder.mask_tokens.weight"].shape[0]
        iou_prefix = "mask_decoder.iou_prediction_head.layers."
        iou_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(iou_prefix))
        dec_depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("mask_decoder.transformer.layers."))
        dec = MaskDecoderConfig(
            num_multimask_outputs=n_masks - 1,
            iou_head_depth=iou_layers,
            iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
            transformer_depth=dec_depth,
            transformer_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample_rate=enc.out_chans
            // sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0],
        )
        prompt = PromptEncoderConfig(mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0])
        return ModelConfig(image_encoder=enc, prompt_encoder=prompt, mask_decoder=dec, memory=memory, fullres=fullres)
    except (KeyError, IndexError, ValueError, ConfigError) as exc:
        raise CheckpointError(
            f"the checkpoint does not have SAM-Med3D's layout (could not read {exc}); "
            "is it a checkpoint of another architecture?"
        ) from None


# ------------------------------------------------------------------------- configurations from files
def _check_config_value(where: str, name: str, default: Any, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` has the JSON type of the field's ``default`` and a sane range."""
    what = f"{where}.{name}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, not {value!r:.60}")
    elif isinstance(default, int):
        low = 0 if name in _ZERO_ALLOWED else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_CONFIG_INT:
            raise ConfigError(f"{what} must be an integer from {low} to {_MAX_CONFIG_INT}, not {value!r:.60}")
    elif isinstance(default, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not 0 < value <= _MAX_CONFIG_INT:
            raise ConfigError(f"{what} must be a positive number, not {value!r:.60}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be text, not {value!r:.60}")
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_CONFIG_INT for v in value
        )
        if not ok or len(value) > _MAX_CONFIG_INT:
            raise ConfigError(f"{what} must be a list of block indices (integers >= 0), not {value!r:.60}")


def parse_stored_config(raw: Any) -> ModelConfig:
    """Check a configuration stored in a checkpoint (``ModelConfig.to_dict()`` form) and build it.

    Every section must be an object (``memory`` may be null), every field must have its field's type (integers
    in [1, 2^24], a few may be 0; positive finite numbers; text; true/false; lists of block indices).

    Raises:
        ConfigError: not an object, a section not an object, a wrongly typed or out-of-range field, unknown
        fields, or an inconsistent combination (:class:`ModelConfig` checks).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"it is {type(raw).__name__} {raw!r:.60}, not an object of sections")
    for section, cls in _CONFIG_SECTIONS.items():
        values = raw.get(section, None if section == "fullres" else {})
        if values is None and section in _OPTIONAL_SECTIONS:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section} must be an object, not {values!r:.60}")
        for f in dataclasses.fields(cls):
            if f.name in values:
                _check_config_value(section, f.name, f.default, values[f.name])
    return ModelConfig.from_dict(raw)


_MLP_WIDTH = "image_encoder MLP width (embed_dim x mlp_ratio)"


def _shape_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The configuration values that fix the backbone's tensor shapes (those :func:`infer_config` reads back),
    normalised so that equal shapes give equal values (a window covering the whole grid is global attention)."""
    enc, dec = cfg.image_encoder, cfg.mask_decoder
    windowed = enc.window_size > cfg.grid_size
    return {
        "image_encoder.img_size": enc.img_size,
        "image_encoder.patch_size": enc.patch_size,
        "image_encoder.in_chans": enc.in_chans,
        "image_encoder.embed_dim": enc.embed_dim,
        "image_encoder.depth": enc.depth,
        "image_encoder.num_heads": enc.num_heads,
        _MLP_WIDTH: int(enc.embed_dim * enc.mlp_ratio),
        "image_encoder.window_size": enc.window_size if windowed else 0,
        "image_encoder.global_attn_indexes": tuple(enc.global_attn_indexes) if windowed else (),
        "image_encoder.out_chans": enc.out_chans,
        "prompt_encoder.mask_in_chans": cfg.prompt_encoder.mask_in_chans,
        "mask_decoder.num_multimask_outputs": dec.num_multimask_outputs,
        "mask_decoder.iou_head_depth": dec.iou_head_depth,
        "mask_decoder.iou_head_hidden_dim": dec.iou_head_hidden_dim,
        "mask_decoder.transformer_depth": dec.transformer_depth,
        "mask_decoder.transformer_mlp_dim": dec.transformer_mlp_dim,
        "mask_decoder.attention_downsample_rate": dec.attention_downsample_rate,
    }


def _memory_sketch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """State dict (``memory_attention.*`` keys) of the memory attention ``cfg`` describes, on the meta device:
    shapes only, no memory allocated. Empty when ``cfg`` has no memory."""
    if cfg.memory is None:
        return {}
    with torch.device("meta"):
        module = MemoryAttention(cfg.embed_dim, cfg.memory)
    return {MEMORY_PREFIX + k: v for k, v in module.state_dict().items()}


def _fullres_sketch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """State dict (``fullres_head.*`` keys) of the full-resolution head ``cfg`` describes, on the meta device."""
    if cfg.fullres is None:
        return {}
    with torch.device("meta"):
        module = FullResHead(cfg.embed_dim, cfg.image_encoder.img_size, cfg.fullres)
    return {FULLRES_PREFIX + k: v for k, v in module.state_dict().items()}


def check_config_matches_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a stored configuration that does not describe the tensors in its own file.

    The backbone configuration is compared with the one read off the weights' shapes (:func:`infer_config`),
    and the memory attention's shapes (when the file has its weights) with a meta-device sketch, so a file
    that claims a bigger network than it holds is refused before anything is built.

    Raises:
        CheckpointError: the weights are not in SAM-Med3D's layout, or differ from the configuration (the
        message names the fields).
    """
    claimed, found = _shape_fields(cfg), _shape_fields(infer_config(sd))
    found[_MLP_WIDTH] = sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]  # exact (the inferred ratio is rounded)
    diffs = [f"{k} {v} in the configuration, {found[k]} in the weights" for k, v in claimed.items() if v != found[k]]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} stores a model configuration that does not match its own weights "
            f"({'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); the file is damaged or was edited. "
            "Nothing was built"
        )
    for prefix, sketch, part in (
        (MEMORY_PREFIX, _memory_sketch, "memory"),
        (FULLRES_PREFIX, _fullres_sketch, "full-resolution head"),
    ):
        stored = {k: v for k, v in sd.items() if k.startswith(prefix)}
        if not stored:
            continue  # the part starts fresh
        try:
            check_state_dict(sketch(cfg), stored)
        except CheckpointError as exc:
            raise CheckpointError(
                f"checkpoint {where} stores a {part} configuration that does not match its own {part} weights: "
                f"{str(exc).split(': ', 1)[-1]}"
            ) from None


def estimated_model_bytes(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> int:
    """Bytes of float32 parameters the network of ``cfg`` will hold, given that its backbone matches the
    backbone tensors of ``sd`` (:func:`check_config_matches_weights`): those tensors' element count plus the
    memory attention's (from a meta-device sketch, so this allocates nothing)."""
    backbone = sum(t.numel() for k, t in sd.items() if not k.startswith(_OPTIONAL_PREFIXES))
    memory = sum(t.numel() for t in _memory_sketch(cfg).values())
    head = sum(t.numel() for t in _fullres_sketch(cfg).values())
    return 4 * (backbone + memory + head)


def check_fits_in_memory(cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to build a network whose weights alone would not fit in the memory available now.

    Raises:
        CheckpointError: the estimate (:func:`estimated_model_bytes`) exceeds the available memory.
    """
    need = estimated_model_bytes(cfg, sd)
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise CheckpointError(
            f"the network of checkpoint {where} needs {need / 2**30:.1f} GiB for its weights but only "
            f"{avail / 2**30:.1f} GiB of memory is available; close other programs or use a machine with more "
            "memory (if the file should be small, it is damaged)"
        )


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming every missing/unexpected key and wrong shape."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not fit the network (nothing was loaded): "
            + " | ".join(problems)
            + ". Use the model preset the checkpoint was trained with, or a checkpoint of this architecture."
        )


# ----------------------------------------------------------------------------------- public API
def load_checkpoint(
    path: str | os.PathLike, trusted: bool = False
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Read and identify a checkpoint: ``(source, state_dict, metadata)``; see :func:`split_checkpoint`."""
    return split_checkpoint(read_checkpoint(path, trusted=trusted))


def build_model(
    preset: str | ModelConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    trusted: bool = False,
    precision: str = "float32",
) -> MAISModel:
    """Build the network, optionally loading weights strictly. The model is returned in eval mode.

    Args:
        preset: preset name (``"sam-med3d-vit-b"``...) or a :class:`ModelConfig`. None: take the
            configuration from the checkpoint (stored in ours, read off the shapes of SAM-Med3D's).
        checkpoint: a SAM-Med3D or MAISSegment checkpoint file; None leaves random weights.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        trusted: allow unsafe unpickling of this file (see :func:`read_checkpoint`).
        precision: inference precision, ``"float32"``, ``"bfloat16"`` or ``"auto"`` (bfloat16 where it is faster;
            :mod:`MAISSegmentLib.precision`); training is not affected.

    Returns:
        :class:`MAISModel` with ``model.load_report`` (:class:`LoadReport`).

    Raises:
        ConfigError: unknown preset or device. CheckpointError: the file cannot be loaded (nothing is).
    """
    dev = resolve_device(device)
    check_precision(precision)
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if checkpoint is None:
        if cfg is None:
            raise ConfigError("build_model needs a preset/config or a checkpoint")
        model = MAISModel(cfg)
        model.load_report = LoadReport(
            "none",
            memory_attention="fresh" if model.has_memory else "absent",
            fullres_head="fresh" if model.has_fullres else "absent",
        )
        model = model.to(dev).eval()
        set_inference_precision(model, precision)
        return model

    source, sd, meta = load_checkpoint(checkpoint, trusted=trusted)
    report = LoadReport(source, path=str(checkpoint))
    if "_note" in meta:
        report.notes.append(meta["_note"])
    from_file = cfg is None  # the configuration comes from the file: bound it before building
    if source == "maissegment":
        try:
            stored = parse_stored_config({} if meta.get("config") is None else meta["config"])
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {checkpoint} stores an invalid model configuration: {exc}") from None
        check_config_matches_weights(stored, sd, str(checkpoint))
        if cfg is None:
            cfg = stored
        report.model_id, report.version = meta.get("model_id"), meta.get("version")
        report.provenance = dict(meta.get("provenance") or {})
        digest = state_dict_sha256(sd)
        if meta.get("sha256") and meta["sha256"] != digest:
            raise CheckpointError(
                f"checkpoint {checkpoint} is corrupt: its weights' SHA-256 {digest[:12]}... does not match the "
                f"recorded {str(meta['sha256'])[:12]}...; download or copy it again"
            )
        report.sha256 = digest
    elif cfg is None:  # a SAM-Med3D file: its backbone, plus a fresh memory attention and full-resolution head
        cfg = infer_config(sd, memory=MemoryConfig(), fullres=FullResConfig())
        report.notes.append("configuration read from the checkpoint's shapes")
    if from_file:
        check_fits_in_memory(cfg, sd, str(checkpoint))
    model = _build_network(cfg, str(checkpoint)) if from_file else MAISModel(cfg)
    expected = model.state_dict()
    has_memory_weights = any(k.startswith(MEMORY_PREFIX) for k in sd)
    if model.has_memory and not has_memory_weights:
        expected = {k: v for k, v in expected.items() if not k.startswith(MEMORY_PREFIX)}
        model.init_fresh_memory()  # the same file always gives the same network (saved sessions replay exactly)
        report.memory_attention = "fresh"
        report.notes.append("the checkpoint has no memory attention: it starts fresh (untrained)")
    elif model.has_memory:
        report.memory_attention = "loaded"
    else:
        report.memory_attention = "absent"
    if model.has_fullres and not any(k.startswith(FULLRES_PREFIX) for k in sd):
        expected = {k: v for k, v in expected.items() if not k.startswith(FULLRES_PREFIX)}
        model.init_fresh_fullres()  # fixed seed, as the memory attention
        report.fullres_head = "fresh"
        report.notes.append(
            "the checkpoint has no full-resolution head: it starts fresh (the decoder's 32^3 logits upsampled)"
        )
    elif model.has_fullres:
        report.fullres_head = "loaded"
    check_state_dict(expected, sd)
    model.load_state_dict(sd, strict=False)  # every key and shape was checked above
    model.load_report = report
    model = model.to(dev).eval()
    set_inference_precision(model, precision)
    return model


def _build_network(cfg: ModelConfig, where: str) -> MAISModel:
    """The network of a configuration read from a file; one that the network's parts refuse (e.g. a head count
    that does not divide a width) is a :class:`CheckpointError`."""
    try:
        return MAISModel(cfg)
    except (ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"checkpoint {where} stores an invalid model configuration: {exc}") from None


def save_checkpoint(
    model: MAISModel,
    path: str | os.PathLike,
    model_id: str,
    version: str,
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a MAISSegment checkpoint atomically (a temporary file renamed into place).

    Args:
        model: the network (its ``cfg`` and all weights, memory attention included, are saved).
        path: destination file; an existing file is replaced only once the new one is complete.
        model_id, version: identity of the model (e.g. ``"mais-small-shared"``, ``"1.0.0"``).
        provenance: JSON-like training recipe / data / command / metrics.
        extra: more plain-data entries (e.g. optimizer state for resuming training).

    Returns:
        The SHA-256 of the weights' content.
    """
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = state_dict_sha256(sd)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "version": version,
        "config": model.cfg.to_dict(),
        "state_dict": sd,
        "provenance": provenance or {},
        "sha256": digest,
        **(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return digest


RELEASE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


def export_release(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "float16",
    model_id: str | None = None,
    version: str | None = None,
    provenance: dict[str, Any] | None = None,
    trusted: bool = False,
) -> dict[str, Any]:
    """Turn a training checkpoint into a release file: weights only, optionally stored at half precision.

    The optimizer/scheduler state of a training checkpoint (about twice the weights) is dropped; the
    configuration, id, version and provenance are kept (``provenance`` entries given here are merged in,
    e.g. the test-split figures of the model card). Floating-point weights are *stored* as ``dtype``;
    :func:`build_model` copies them into the float32 network, so inference is unchanged apart from the
    rounding of the weights (float16 keeps 11 significant bits; check the figures on the exported file).

    Args:
        src: a MAISSegment or SAM-Med3D checkpoint. dst: the release file (written atomically).
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"int8"`` (matrices as int8 rows with float32
            scales, the rest float16: :mod:`MAISSegmentLib.quantize`; about half the size of float16).
        model_id, version: identity (default: the source's, else the file name / ``"0"``).

    Returns:
        ``{"path", "size_bytes", "file_sha256", "weights_sha256", "dtype", "parameters"}``.

    Raises:
        ConfigError: unknown dtype. CheckpointError: unreadable source, or weights that overflow ``dtype``.
    """
    if dtype not in RELEASE_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(RELEASE_DTYPES)}")
    model = build_model(None, checkpoint=src, trusted=trusted)
    report = model.load_report
    target = RELEASE_DTYPES[dtype]
    sd: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    if dtype == "int8":
        stored, scales = quantise_state_dict(model.state_dict())
        sd = dequantise_state_dict(stored, scales)  # what a load gives: the digest is of these weights
        extra = {"quant_scales": scales}
    for k, v in ({} if dtype == "int8" else model.state_dict()).items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dtype != target:
            cast = v.to(target)
            if not torch.isfinite(cast).all() and torch.isfinite(v).all():
                raise CheckpointError(f"weight {k} does not fit in {dtype} (overflow); export with --dtype float32")
            v = cast
        sd[k] = v.contiguous()
    digest = state_dict_sha256(sd)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id or report.model_id or pathlib.Path(src).stem,
        "version": version or report.version or "0",
        "config": model.cfg.to_dict(),
        "state_dict": stored if dtype == "int8" else sd,
        **extra,
        "provenance": {**(report.provenance or {}), **(provenance or {})},
        "sha256": digest,
        "storage_dtype": dtype,
    }
    atomic_write(dst, lambda tmp: torch.save(payload, tmp))
    h = hashlib.sha256()
    with open(dst, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return {
        "path": str(dst),
        "size_bytes": os.path.getsize(dst),
        "file_sha256": h.hexdigest(),
        "weights_sha256": digest,
        "dtype": dtype,
        "parameters": sum(t.numel() for t in sd.values()),
    }
