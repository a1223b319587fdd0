"""Model registry, weight cache, download and import of local weight files.

* **Registry**: ``Resources/models.json`` (at the repository root in a checkout, ``MAISSegmentLib/_resources`` in
  an installed wheel: :mod:`.resources`; override with the ``registry`` argument or the ``MAIS_MODELS_JSON``
  environment variable)::

      {"version": 1, "default": <id or null>,
       "models": [{"id", "version", "file", "url" (or null), "sha256" (or null = not yet known),
                   "size_bytes" (or null), "license", "format" ("maissegment" | "sam-med3d"),
                   "preset", "description", "trained_on"}]}

  A model's file is *bundled* when it lies beside ``models.json`` (``Resources/<file>``); otherwise it is
  looked for in the cache.
* **Cache**: ``$MAIS_WEIGHTS_DIR``, else ``~/.cache/maissegment/weights``. Downloads of registered
  models go to ``<cache>/<file>``; imported models with ids of their own to ``<cache>/imported/<id>.pth``.
  ``<cache>/user_models.json`` records what was imported or downloaded (id -> file, SHA-256, size,
  source, format, preset, date), so a damaged file is detected even before the registry knows the hash.
* Files are verified by SHA-256 whenever it is known (the registry's, else the one recorded on import or
  download). A registered model without a SHA-256 in the registry (``sam-med3d-turbo`` today) is *trusted on
  first use*: its first download must load as the registered network, its hash is recorded, and every later
  load and re-download must match that hash (:attr:`ModelEntry.verification_text` says which case applies).
  Every write is to a temporary file in the same folder, renamed into place only once it is complete and
  verified: an interrupted or failed download never leaves a partial file.
* Downloads follow redirects only to ``https://`` addresses (never down to plain http), and stop at the
  registry's ``size_bytes`` when known, else at :data:`MAX_DOWNLOAD_BYTES`.

Nothing here is downloaded implicitly: :func:`download` is the user's action (``mais weights download``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import MAISError
from .fileutil import atomic_write
from .resources import resources_dir

REGISTRY_VERSION = 1
USER_REGISTRY_VERSION = 1
FORMATS = ("maissegment", "sam-med3d")
RESOURCES = resources_dir()  # Resources/ of the checkout, or its copy inside an installed wheel
DEFAULT_REGISTRY = RESOURCES / "models.json"
ENV_REGISTRY = "MAIS_MODELS_JSON"
ENV_CACHE = "MAIS_WEIGHTS_DIR"
USER_REGISTRY = "user_models.json"
CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
# Cap on a download whose size the registry does not record: ten times the largest SAM-Med3D checkpoint
# (vit-b, ~400 MiB), so a wrong URL or a hostile server cannot fill the disk.
MAX_DOWNLOAD_BYTES = 4 << 30
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
# Field of a registry entry -> (accepted JSON types, what the message calls them); every field but id,
# file and format may also be null.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "text"),
    "version": ((str, int, float), "text or a number"),
    "file": ((str,), "text"),
    "url": ((str,), "text"),
    "sha256": ((str,), "text"),
    "size_bytes": ((int,), "an integer"),
    "license": ((str,), "text"),
    "format": ((str,), "text"),
    "preset": ((str,), "text"),
    "description": ((str,), "text"),
    "trained_on": ((str,), "text"),
}
_FIELDS = tuple(_FIELD_TYPES)
_REQUIRED = ("id", "file", "format")
# Fields of a record in the cache's user_models.json (all may be null).
_RECORD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    **{k: v for k, v in _FIELD_TYPES.items() if k not in ("id", "url")},
    "origin": ((str,), "text"),
    "source": ((str,), "text"),
    "imported_at": ((str,), "text"),
}

ProgressCallback = Callable[[int, "int | None"], None]


class WeightsError(MAISError, ValueError):
    """A model that is unknown, missing, damaged, or cannot be downloaded or imported (the message says
    what to do)."""


@dataclass
class ModelEntry:
    """One model, registered (``builtin``) or imported by the user.

    Attributes:
        id, version, file, url, sha256, size_bytes, license, format, preset, description, trained_on:
            the registry fields (for an imported model: what was found in its file).
        builtin: registered in ``models.json`` (else only in the cache's ``user_models.json``).
        path: where the file is (or would be once downloaded).
        status: ``"bundled"``, ``"cached"``, ``"imported"``, ``"not downloaded"``, ``"missing"`` (an
            imported file that is gone) or ``"damaged"`` (wrong size; cheap check, the SHA-256 is
            checked by :func:`resolve`).
        local_sha256: the SHA-256 recorded when the file was imported or downloaded.
        source: where an imported/downloaded file came from (path or URL).
        imported_at: when (ISO 8601, UTC).
        notes: remarks of :func:`import_weights` (e.g. the SHA-256 to record in ``models.json``).
    """

    id: str
    version: str | None = None
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    license: str | None = None
    format: str | None = None
    preset: str | None = None
    description: str | None = None
    trained_on: str | None = None
    builtin: bool = False
    path: Path | None = None
    status: str = "not downloaded"
    local_sha256: str | None = None
    source: str | None = None
    imported_at: str | None = None
    origin: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def expected_sha256(self) -> str | None:
        """The SHA-256 the file must have: the registry's, else the one recorded locally."""
        return self.sha256 or self.local_sha256

    @property
    def verification_text(self) -> str:
        """How the file is verified, in words for a listing (``mais weights list``, the Slicer module).

        ``"verified (SHA-256 in the registry)"``; ``"SHA-256 recorded at first download (trust on first use)"``
        or ``"SHA-256 recorded at import"`` (no registry hash, the local record is checked);
        ``"unverified (first download records the hash)"`` (downloadable, no hash known yet);
        ``"unverified (no SHA-256 known)"``.
        """
        if self.sha256:
            return "verified (SHA-256 in the registry)"
        if self.local_sha256:
            if self.origin == "download":
                return "SHA-256 recorded at first download (trust on first use)"
            return "SHA-256 recorded at import"
        if self.builtin and self.url:
            return "unverified (first download records the hash)"
        return "unverified (no SHA-256 known)"


# ------------------------------------------------------------------------------------ locations
def registry_path(registry: str | os.PathLike | None = None) -> Path:
    """The registry file: ``registry``, else ``$MAIS_MODELS_JSON``, else ``Resources/models.json``."""
    if registry is not None:
        return Path(registry)
    env = os.environ.get(ENV_REGISTRY)
    return Path(env) if env else DEFAULT_REGISTRY


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The weight cache: ``cache``, else ``$MAIS_WEIGHTS_DIR``, else ``~/.cache/maissegment/weights``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "maissegment" / "weights"


# ------------------------------------------------------------------------------------- registry
def _relative_file(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WeightsError(f"{where}: 'file' must be a file name")
    pp = PurePosixPath(value)
    if pp.is_absolute() or ".." in pp.parts or "\\" in value or ":" in value:
        raise WeightsError(f"{where}: 'file' {value!r} must be a relative path without '..'")
    return value


def _check_types(record: dict[str, Any], types: dict[str, tuple[tuple[type, ...], str]], where: str) -> None:
    """Raise :class:`WeightsError` naming the first field of ``record`` whose JSON type is wrong (null is
    accepted here; required fields are checked by the caller). ``true``/``false`` are not numbers."""
    for name, (accepted, what) in types.items():
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise WeightsError(f"{where}: '{name}' must be {what} or null, not {type(value).__name__} {value!r:.60}")


def load_registry(registry: str | os.PathLike | None = None) -> tuple[str | None, list[ModelEntry]]:
    """Read and check the registry: ``(default id or None, registered models)``.

    Raises:
        WeightsError: missing or malformed file (the message names the field).
    """
    path = registry_path(registry)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(
            f"model registry {path} does not exist (reinstall MAISSegment or fix {ENV_REGISTRY})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"model registry {path} cannot be read: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise WeightsError(f"model registry {path} has no 'models' list")
    if doc.get("version") != REGISTRY_VERSION:
        raise WeightsError(
            f"model registry {path} has version {doc.get('version')!r}; this MAISSegment reads version "
            f"{REGISTRY_VERSION} (update MAISSegment)"
        )
    entries: list[ModelEntry] = []
    for i, raw in enumerate(doc["models"]):
        where = f"model registry {path}, model {i + 1}"
        if not isinstance(raw, dict):
            raise WeightsError(f"{where} is not an object")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise WeightsError(f"{where}: unknown field(s) {', '.join(unknown)}")
        mid = raw.get("id")
        if not isinstance(mid, str) or not _ID.match(mid):
            raise WeightsError(f"{where}: invalid id {mid!r} (letters, digits, '.', '_', '-')")
        where = f"model registry {path}, model {mid!r}"
        _check_types(raw, _FIELD_TYPES, where)
        sha = raw.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA.match(sha.lower())):
            raise WeightsError(f"{where}: 'sha256' must be 64 hex digits or null")
        size = raw.get("size_bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise WeightsError(f"{where}: 'size_bytes' must be a positive integer or null")
        if raw.get("format") not in FORMATS:
            raise WeightsError(f"{where}: 'format' must be one of {', '.join(FORMATS)}")
        url = raw.get("url")
        if url is not None and (not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in ("http", "https")):
            raise WeightsError(f"{where}: 'url' must be an http(s) URL or null")
        if any(e.id == mid for e in entries):
            raise WeightsError(f"model registry {path}: id {mid!r} appears twice")
        entries.append(
            ModelEntry(
                id=mid,
                version=None if raw.get("version") is None else str(raw["version"]),
                file=_relative_file(raw.get("file"), where),
                url=url,
                sha256=sha.lower() if sha else None,
                size_bytes=size,
                license=raw.get("license"),
                format=raw["format"],
                preset=raw.get("preset"),
                description=raw.get("description"),
                trained_on=raw.get("trained_on"),
                builtin=True,
            )
        )
    default = doc.get("default")
    if default is not None and not isinstance(default, str):
        raise WeightsError(f"model registry {path}: 'default' must be a model id (text) or null, not {default!r:.60}")
    if default is not None and not any(e.id == default for e in entries):
        raise WeightsError(f"model registry {path}: default {default!r} is not one of its models")
    return default, entries


def default_model_id(registry: str | os.PathLike | None = None) -> str | None:
    """The registry's default model id, or None when none is registered yet."""
    return load_registry(registry)[0]


def _check_user_record(model_id: str, record: Any) -> None:
    """Raise ``TypeError`` (turned into "damaged" by the reader) for a malformed user_models.json record."""
    if not _ID.match(model_id):
        raise TypeError(f"invalid model id {model_id!r}")
    if not isinstance(record, dict):
        raise TypeError(f"model {model_id!r} is not an object")
    try:
        _check_types(record, _RECORD_TYPES, f"model {model_id!r}")
    except WeightsError as exc:
        raise TypeError(str(exc)) from None
    sha = record.get("sha256")
    if sha is not None and not _SHA.match(sha):
        raise TypeError(f"model {model_id!r}: 'sha256' is not 64 lower-case hex digits")


def _read_user_registry(cache: Path) -> dict[str, dict[str, Any]]:
    """The records of the cache's ``user_models.json`` (id -> record), checked field by field.

    Raises:
        WeightsError: the file cannot be read or a record is malformed (the message names it).
    """
    path = cache / USER_REGISTRY
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        models = doc["models"]
        if not isinstance(models, dict):
            raise TypeError("'models' is not an object")
        for model_id, record in models.items():
            _check_user_record(model_id, record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path} is damaged ({exc}); delete it and import/download the models again") from None
    return models


def _write_user_registry(cache: Path, models: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"version": USER_REGISTRY_VERSION, "models": models}, indent=1, sort_keys=True)
    _write_atomic(cache / USER_REGISTRY, text.encode("utf-8"))


def _record(cache: Path, model_id: str, info: dict[str, Any]) -> None:
    models = _read_user_registry(cache)
    models[model_id] = info
    _write_user_registry(cache, models)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------- models
def _locate(entry: ModelEntry, reg_dir: Path, cache: Path, rec: dict[str, Any] | None) -> None:
    """Fill ``path``, ``status`` and the locally recorded fields of an entry (cheap: no hashing)."""
    if rec:
        entry.local_sha256 = rec.get("sha256")
        entry.source = rec.get("source")
        entry.imported_at = rec.get("imported_at")
        entry.origin = rec.get("origin")
    size = entry.size_bytes or (rec or {}).get("size_bytes")
    if entry.builtin:
        bundled = reg_dir / entry.file
        if bundled.is_file():
            entry.path, entry.status = bundled, "bundled"
            return
        entry.path = cache / entry.file
        if not entry.path.is_file():
            entry.status = "not downloaded"
            return
        entry.status = "imported" if (rec or {}).get("origin") == "import" else "cached"
    else:
        entry.path = cache / entry.file
        if not entry.path.is_file():
            entry.status = "missing"
            return
        entry.status = "imported"
    if size and entry.path.stat().st_size != size:
        entry.status = "damaged"


def list_models(registry: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Registered models, then the ones imported under ids of their own, with where they are."""
    _, entries = load_registry(registry)
    reg_dir = registry_path(registry).parent
    cdir = cache_dir(cache)
    user = _read_user_registry(cdir)
    for e in entries:
        _locate(e, reg_dir, cdir, user.get(e.id))
    known = {e.id for e in entries}
    for mid, rec in sorted(user.items()):
        if mid in known:
            continue
        e = ModelEntry(
            id=mid,
            version=None if rec.get("version") is None else str(rec["version"]),
            file=_relative_file(rec.get("file") or f"imported/{mid}.pth", f"{cdir / USER_REGISTRY}, model {mid!r}"),
            sha256=None,
            size_bytes=rec.get("size_bytes"),
            license=rec.get("license"),
            format=rec.get("format"),
            preset=rec.get("preset"),
            description=rec.get("description") or "imported from a local file",
            trained_on=rec.get("trained_on"),
        )
        _locate(e, reg_dir, cdir, rec)
        entries.append(e)
    return entries


def get_model(
    model_id: str, registry: str | os.PathLike | None = None, cache: str | os.PathLike | None = None
) -> ModelEntry:
    """The entry of one model.

    Raises:
        WeightsError: unknown id (the message lists the known ones).
    """
    models = list_models(registry, cache)
    for e in models:
        if e.id == model_id:
            return e
    known = ", ".join(e.id for e in models) or "none"
    raise WeightsError(
        f"unknown model {model_id!r} (known: {known}); import a weight file with "
        f"`mais weights import FILE --id {model_id}`"
    )


def _how_to_get(entry: ModelEntry) -> str:
    ways = []
    if entry.builtin and entry.url:
        ways.append(f"`mais weights download {entry.id}`")
    ways.append(f"`mais weights import FILE --id {entry.id}`")
    return "run " + " or ".join(ways)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve(
    model_id: str,
    registry: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    verify: bool = True,
) -> Path:
    """Path of a model's weight file: bundled under ``Resources/``, downloaded or imported.

    Args:
        model_id: a registered or imported id.
        verify: check the file's size and SHA-256 when known (about a second per 400 MB).

    Raises:
        WeightsError: unknown id, file not there (the message says which command gets it), or damaged.
    """
    entry = get_model(model_id, registry, cache)
    if entry.status in ("not downloaded", "missing"):
        gone = "is not downloaded" if entry.status == "not downloaded" else f"file {entry.path} is gone"
        raise WeightsError(f"model {model_id!r} {gone}; {_how_to_get(entry)}")
    assert entry.path is not None
    if entry.status == "damaged":
        raise WeightsError(
            f"model {model_id!r}: {entry.path} has the wrong size ({entry.path.stat().st_size} bytes; incomplete "
            f"or damaged); {_how_to_get(entry)}" + (" with --replace" if not entry.url or not entry.builtin else "")
        )
    expected = entry.expected_sha256
    if verify and expected:
        digest = file_sha256(entry.path)
        if digest != expected:
            redo = (
                f"`mais weights download {model_id}`"
                if entry.builtin and entry.url
                else f"`mais weights import FILE --id {model_id} --replace`"
            )
            raise WeightsError(
                f"model {model_id!r}: {entry.path} is damaged or a different file (SHA-256 {digest[:12]}... instead "
                f"of {expected[:12]}...); run {redo} to replace it"
            )
    return entry.path


# ----------------------------------------------------------------------------------- file writes
def _tmp_beside(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part"


def _write_atomic(dest: Path, data: bytes) -> None:
    atomic_write(dest, lambda tmp: tmp.write_bytes(data))


def _size(path: Path) -> int:
    """Size of a file in bytes, 0 when it is not there (for messages about a partial download)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot create the weight cache {path} ({exc}); set {ENV_CACHE} to a writable folder"
        ) from None


# ------------------------------------------------------------------------------------ validation
def _backbone(cfg: Any) -> tuple[Any, Any, Any]:
    enc = dataclasses.replace(cfg.image_encoder, exact_fast_windows=True)  # a speed switch, not a layout
    return enc, cfg.prompt_encoder, cfg.mask_decoder


def _preset_of(cfg: Any) -> str | None:
    from .model.config import PRESETS, get_preset

    for name in PRESETS:
        if _backbone(get_preset(name)) == _backbone(cfg):
            return name
    return None


def _preset_backbone_keys(preset: str) -> int:
    """Number of backbone (non-memory) state-dict keys of a preset, from a weightless (meta) model."""
    import torch

    from .model.config import get_preset
    from .model.mais import MAISModel

    with torch.device("meta"):
        model = MAISModel(get_preset(preset))
    return len(model.sam_state_dict())


def inspect_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict[str, Any]:
    """Load a weight file into its network (strictly; :func:`checkpoint.build_model`) and describe it.

    Returns:
        ``format`` (``"maissegment"``/``"sam-med3d"``), ``preset`` (matching backbone preset or None),
        ``backbone_keys``, ``model_id``, ``version``, ``memory_attention``, ``provenance``, ``sha256`` (of the
        weights' content; None for a SAM-Med3D file).

    Raises:
        CheckpointError: not a loadable checkpoint (nothing is registered).
    """
    from .checkpoint import build_model

    model = build_model(None, checkpoint=path, device="cpu", trusted=trusted)
    report = model.load_report
    info = {
        "format": report.source,
        "preset": _preset_of(model.cfg),
        "backbone_keys": len(model.sam_state_dict()),
        "model_id": report.model_id,
        "version": report.version,
        "memory_attention": report.memory_attention,
        "provenance": report.provenance,
        "sha256": report.sha256,
    }
    del model
    return info


def _check_identity(entry: ModelEntry, info: dict[str, Any], what: str) -> None:
    """Refuse a file that cannot be the registered model ``entry`` (wrong format or layout)."""
    if entry.format and info["format"] != entry.format:
        raise WeightsError(
            f"{what} is not {entry.id!r}: it is a {info['format']} checkpoint, {entry.id!r} is a {entry.format} one"
        )
    if entry.preset:
        expected_keys = _preset_backbone_keys(entry.preset)
        if info["preset"] != entry.preset or info["backbone_keys"] != expected_keys:
            found = info["preset"] or "no known preset"
            raise WeightsError(
                f"{what} is not {entry.id!r}: its network has the layout of {found} ({info['backbone_keys']} "
                f"backbone tensors), {entry.id!r} has the {entry.preset} layout ({expected_keys} tensors)"
            )


# ------------------------------------------------------------------------------------- download
class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an ``https://`` address: a download is never moved down to plain http (where
    anyone on the way could swap the file) nor to another scheme."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's hook, called before following
        if urllib.parse.urlparse(newurl).scheme.lower() != "https":
            fp.close()
            raise WeightsError(
                f"download refused: {req.full_url} redirects (HTTP {code}) to {newurl}, which is not an https:// "
                "address; report it, or download the file yourself and run `mais weights import FILE --id ID`"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_url(url: str, timeout: float) -> Any:
    """Open ``url`` for reading (https-only redirects, our User-Agent); urllib's exceptions pass through."""
    from . import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"MAISSegment/{__version__}"})
    return urllib.request.build_opener(_HttpsOnlyRedirects).open(request, timeout=timeout)


def _download_limit(entry: ModelEntry, max_bytes: int) -> tuple[int, str]:
    """Most bytes a download of ``entry`` may have: the registry's size when known, else ``max_bytes``;
    with the phrase that names the limit in messages."""
    if entry.size_bytes:
        return entry.size_bytes, f"the registry's size of {entry.size_bytes} bytes"
    return max_bytes, f"the limit of {max_bytes} bytes for a model without a registered size"


def _stream(
    resp: Any, out: Any, entry: ModelEntry, max_bytes: int, progress: ProgressCallback | None
) -> tuple[int, str]:
    """Copy the response body into ``out`` chunk by chunk, hashing it and stopping as soon as it exceeds the
    limit (:func:`_download_limit`).

    Returns:
        ``(bytes written, their SHA-256)``.

    Raises:
        WeightsError: announced or actual size over the limit, or fewer bytes than announced.
    """
    most, what = _download_limit(entry, max_bytes)
    length = resp.headers.get("Content-Length")
    announced = int(length) if length and length.isdigit() else None
    if announced is not None and entry.size_bytes and announced != entry.size_bytes:
        raise WeightsError(
            f"download of {entry.id!r} failed: the server offers {announced} bytes, the registry expects "
            f"{entry.size_bytes}; the file at {resp.geturl()} changed (update MAISSegment)"
        )
    if announced is not None and announced > most:
        raise WeightsError(
            f"download of {entry.id!r} refused: the server offers {announced} bytes, more than {what}; the file "
            f"at {resp.geturl()} is not the registered one (update MAISSegment)"
        )
    total = announced if announced is not None else entry.size_bytes
    h = hashlib.sha256()
    done = 0
    if progress:
        progress(0, total)
    while chunk := resp.read(CHUNK):
        done += len(chunk)
        if done > most:
            raise WeightsError(f"download of {entry.id!r} stopped: the file is larger than {what}; nothing was kept")
        out.write(chunk)
        h.update(chunk)
        if progress:
            progress(done, total)
    if announced is not None and done != announced:
        raise WeightsError(f"download of {entry.id!r} was cut short ({done} of {announced} bytes); try again")
    return done, h.hexdigest()


def _check_download_identity(entry: ModelEntry, tmp: Path, digest: str) -> None:
    """Check a downloaded file against what is known of the model, before it is kept.

    The registry's SHA-256 when it has one. Otherwise (trust on first use): the hash recorded at the first
    download or import when there is one, else the file must load strictly as the registered network.

    Raises:
        WeightsError: the file is not the model.
    """
    mid = entry.id
    if entry.sha256:
        if digest != entry.sha256:
            raise WeightsError(
                f"download of {mid!r} is not the registered file (SHA-256 {digest[:12]}... instead of "
                f"{entry.sha256[:12]}...); it was damaged in transit or changed on the server. Nothing was kept"
            )
        return
    if entry.local_sha256:
        if digest != entry.local_sha256:
            first = "first downloaded" if entry.origin == "download" else "imported"
            raise WeightsError(
                f"download of {mid!r} differs from the file {first} on {entry.imported_at or 'an earlier date'} "
                f"(SHA-256 {digest[:12]}... now, {entry.local_sha256[:12]}... then): the file at {entry.url} changed "
                "or was tampered with. Nothing was kept; if you trust the new file, download it yourself and run "
                f"`mais weights import FILE --id {mid} --replace`"
            )
        return
    from .errors import CheckpointError

    try:
        info = inspect_checkpoint(tmp)
    except CheckpointError as exc:
        raise WeightsError(f"download of {mid!r} is not a usable checkpoint: {exc}") from None
    _check_identity(entry, info, f"the file downloaded from {entry.url}")


def download(
    model_id: str,
    progress: ProgressCallback | None = None,
    registry: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    force: bool = False,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download a registered model into the cache and return its path.

    The file is streamed into a temporary file in the cache folder and checked: its size (the registry's
    ``size_bytes`` when known, else at most ``max_bytes``; the download stops as soon as it is over), then its
    SHA-256 against the registry's, else against the one recorded at the first download (trust on first use),
    else it must load as the registered network and its SHA-256 is recorded. Only then is it renamed into
    place. Redirects are followed only to https:// addresses. On any failure the temporary file is deleted
    and nothing else changes.

    Args:
        model_id: a registered id with a URL.
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` at the start and after each chunk.
        timeout: seconds without network activity before giving up.
        force: download again even if a verified copy is there.
        max_bytes: size cap when the registry does not record the size (:data:`MAX_DOWNLOAD_BYTES`).

    Raises:
        WeightsError: unknown id, no URL, no network, HTTP error, timeout, redirect to a non-https address,
        file too large, short or not the model, disk error.
    """
    entry = get_model(model_id, registry, cache)
    if not entry.builtin or not entry.url:
        raise WeightsError(
            f"model {model_id!r} has no download address; import the file with "
            f"`mais weights import FILE --id {model_id}`"
        )
    if not force and entry.status in ("bundled", "cached", "imported"):
        try:
            return resolve(model_id, registry, cache)
        except WeightsError:
            if entry.status == "bundled":
                raise
    cdir = cache_dir(cache)
    dest = cdir / entry.file
    _mkdir(dest.parent)
    tmp = _tmp_beside(dest)
    host = urllib.parse.urlparse(entry.url).netloc
    offline = (
        f"on an offline machine, download {entry.url} elsewhere and run `mais weights import FILE --id {model_id}`"
    )
    try:
        try:
            with _open_url(entry.url, timeout) as resp, open(tmp, "wb") as out:
                done, digest = _stream(resp, out, entry, max_bytes, progress)
        except urllib.error.HTTPError as exc:
            raise WeightsError(
                f"download of {model_id!r} failed: HTTP {exc.code} {exc.reason} from {entry.url}"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise WeightsError(
                    f"download of {model_id!r} timed out connecting to {host}; check the network, or {offline}"
                ) from None
            raise WeightsError(
                f"cannot reach {host} to download {model_id!r} ({reason}); check the network connection or "
                f"proxy, or {offline}"
            ) from None
        except TimeoutError:
            raise WeightsError(
                f"download of {model_id!r} stalled (no data for {timeout:g} s after {_size(tmp)} bytes); "
                f"try again, or {offline}"
            ) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise WeightsError(
                f"download of {model_id!r} was interrupted after {_size(tmp)} bytes ({type(exc).__name__}); try again"
            ) from None
        except OSError as exc:
            raise WeightsError(f"cannot write the download to {cdir} ({exc}); free space or set {ENV_CACHE}") from None
        if entry.size_bytes and done != entry.size_bytes:
            raise WeightsError(
                f"download of {model_id!r} has {done} bytes instead of {entry.size_bytes}; it was cut short or the "
                "file changed; try again"
            )
        _check_download_identity(entry, tmp, digest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _record(
        cdir,
        model_id,
        {
            "origin": "download",
            "file": entry.file,
            "sha256": digest,
            "size_bytes": done,
            "source": entry.url,
            "format": entry.format,
            "preset": entry.preset,
            "version": entry.version,
            "imported_at": _now(),
        },
    )
    return dest


# --------------------------------------------------------------------------------------- import
def _default_id(path: Path, info: dict[str, Any]) -> str:
    base = info.get("model_id") or path.name.split(".")[0]
    mid = re.sub(r"[^A-Za-z0-9._-]+", "-", str(base)).strip("-._")[:64]
    return mid or "imported-model"


def import_weights(
    path: str | os.PathLike,
    id: str | None = None,
    replace: bool = False,
    trusted: bool = False,
    registry: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> ModelEntry:
    """Copy a local weight file into the cache and register it (offline sites, own models).

    The file must load strictly into its network (:func:`checkpoint.build_model`). Its id is ``id``, else
    the registered model whose file name it has (``sam_med3d_turbo.pth`` -> ``sam-med3d-turbo``), else the
    ``model_id`` stored in a MAISSegment checkpoint, else the file name. A file given a registered id must
    be that model: the registry's SHA-256 when known, else its format and layout (for
    ``sam-med3d-turbo``: the SAM-Med3D vit-b layout, 324 backbone tensors); its SHA-256 is then reported
    in ``notes`` so that it can be recorded in ``models.json``.

    Args:
        path: the weight file.
        id: the model id to register it under.
        replace: replace a different file already imported under this id.
        trusted: allow unsafe unpickling of this file (only if you trust where it came from).

    Returns:
        The registered :class:`ModelEntry` (``path`` is the cached copy).

    Raises:
        CheckpointError: not a loadable checkpoint. WeightsError: invalid id, the file cannot be the
        registered model, the id is taken by another file (without ``replace``), a copy error.
    """
    src = Path(path).expanduser()
    if not src.is_file():
        raise WeightsError(f"{src} does not exist or is not a file")
    if id is not None and not _ID.match(id):
        raise WeightsError(f"invalid model id {id!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    _, builtins = load_registry(registry)
    cdir = cache_dir(cache)
    user = _read_user_registry(cdir)
    if id is None:
        by_file = [e for e in builtins if PurePosixPath(e.file).name == src.name]
        id = by_file[0].id if by_file else None
    info = inspect_checkpoint(src, trusted=trusted)
    if id is None:
        id = _default_id(src, info)
    digest = file_sha256(src)
    size = src.stat().st_size
    entry = next((e for e in builtins if e.id == id), None)
    notes: list[str] = []
    if entry is not None:
        reg_dir = registry_path(registry).parent
        if (reg_dir / entry.file).is_file():
            raise WeightsError(
                f"model {id!r} is bundled with MAISSegment ({reg_dir / entry.file}); import the file under "
                "another id (--id NAME)"
            )
        if entry.sha256 and digest != entry.sha256:
            raise WeightsError(
                f"{src} is not {id!r}: its SHA-256 {digest[:12]}... differs from the registered "
                f"{entry.sha256[:12]}...; import it under another id (--id NAME)"
            )
        if entry.size_bytes and size != entry.size_bytes:
            raise WeightsError(f"{src} is not {id!r}: {size} bytes instead of {entry.size_bytes}")
        _check_identity(entry, info, str(src))
        if not entry.sha256:
            notes.append(
                f"SHA-256 of {id} ({src.name}, {size} bytes): {digest} - record it in Resources/models.json "
                "so that downloads and copies can be verified"
            )
        dest = cdir / entry.file
    else:
        dest = cdir / "imported" / f"{id}.pth"
    previous = user.get(id)
    if previous and previous.get("sha256") not in (None, digest) and not replace:
        raise WeightsError(
            f"model id {id!r} is already taken by another file ({previous.get('source')}, SHA-256 "
            f"{str(previous.get('sha256'))[:12]}...); choose another --id or pass --replace"
        )
    _mkdir(dest.parent)
    if not (dest.is_file() and dest.stat().st_size == size and file_sha256(dest) == digest):

        def copy_verified(tmp: Path) -> None:
            shutil.copyfile(src, tmp)
            if file_sha256(tmp) != digest:
                raise WeightsError(f"{src} changed while it was being copied; import it again")

        try:
            atomic_write(dest, copy_verified)
        except OSError as exc:
            raise WeightsError(f"cannot copy {src} into {cdir} ({exc}); free space or set {ENV_CACHE}") from None
    record = {
        "origin": "import",
        "file": str(dest.relative_to(cdir).as_posix()),
        "sha256": digest,
        "size_bytes": size,
        "source": str(src.resolve()),
        "format": info["format"],
        "preset": info["preset"],
        "version": info.get("version") or (entry.version if entry else None),
        "imported_at": _now(),
    }
    _record(cdir, id, record)
    result = get_model(id, registry, cdir)
    result.notes = notes
    return result
