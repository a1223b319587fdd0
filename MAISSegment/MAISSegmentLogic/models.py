"""Which network the logic uses: registered, downloaded and imported models, loaded at first use (no Qt).

:class:`ModelChoice` is an entry of the model selector. :class:`ModelsMixin` lists the models (``available_models``),
downloads a registered one (``download_model``, worker thread), imports a local weight file (``import_weights``),
chooses one (``select_model``, ``use_model``) and loads it when an update needs it (``ensure_model``; a failed load
keeps the model in use).
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slicer.i18n import tr as _

from .constants import (
    DEVICES,
)
from .errors import MAISSegmentError


@dataclass(frozen=True)
class ModelChoice:
    """A model offered in the model selector."""

    id: str
    label: str
    usable: bool  # its weight file is here and verified by size (SHA-256 at load)
    download_url: str | None = None  # registered with a URL and not here yet: it can be downloaded
    size_bytes: int | None = None
    verification: str = ""  # how its file is checked (``ModelEntry.verification_text``), e.g. "unverified (first


class ModelsMixin:
    """The logic's model choice, download, import and loading (see the module docstring)."""

    def available_models(self) -> list[ModelChoice]:
        """Registered (``Resources/models.json``) and imported models, with whether their file is there."""
        self.ensure_dependencies()
        from MAISSegmentLib import weights

        status_text = {
            "bundled": _("built in"),
            "cached": _("downloaded"),
            "imported": _("imported"),
            "not downloaded": _("not downloaded"),
            "missing": _("file missing"),
            "damaged": _("damaged"),
        }
        return [
            ModelChoice(
                e.id,
                f"{e.id} ({status_text.get(e.status, e.status)})",
                e.status in ("bundled", "cached", "imported"),
                e.url if e.builtin and e.url and e.status in ("not downloaded", "damaged") else None,
                e.size_bytes,
                e.verification_text,
            )
            for e in weights.list_models()
        ]

    def download_model(self, model_id: str, progress: Callable[[int, int | None], None] | None = None) -> str:
        """Download a registered model into the weight cache (``$MAIS_WEIGHTS_DIR``), checked by size and SHA-256.
        Slow: run it on the worker thread; ``progress(bytes_done, bytes_total_or_None)`` is called from that thread.
        Returns the verified file's path.

        Raises:
            MAISSegmentError: unknown id, no URL, no network, HTTP error, short or damaged file (nothing is left in
            the cache; the model in use is unchanged).
        """
        self.ensure_dependencies()
        from MAISSegmentLib import weights

        try:
            return os.fspath(weights.download(model_id, progress=progress))
        except weights.WeightsError as exc:
            raise MAISSegmentError(
                _("Downloading '{model}' failed: {error}").format(model=model_id, error=exc)
            ) from exc

    @staticmethod
    def _choice_key(choice: dict[str, Any]) -> tuple:
        """What identifies a loaded network: the model id, weight file, device and trust of a model choice."""
        return (choice["model_id"], choice["checkpoint"], choice["device"], choice["trusted"])

    @property
    def model_loaded(self) -> bool:
        """Whether the chosen model is loaded already (else the next update loads it first: seconds)."""
        return self._model is not None and self._model_key in (self._choice_key(self._model_choice), "given")

    def select_model(
        self,
        model_id: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        trusted: bool | None = None,
    ) -> None:
        """Choose the network for the next clicks; it is loaded at first use (:meth:`ensure_model`).

        Args:
            model_id: a registered or imported id (``mais weights list``); "" = the registry's default.
            checkpoint: a weight file instead of an id (SAM-Med3D or MAISSegment checkpoint).
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
            trusted: allow unsafe unpickling of that file (only for files you trust).
        """
        if device is not None and device not in DEVICES and not device.startswith("cuda:"):
            raise MAISSegmentError(_("Unknown device '{device}'.").format(device=device))
        choice = dict(self._model_choice)
        if model_id is not None:
            choice["model_id"], choice["checkpoint"] = model_id, None
        if checkpoint is not None:
            choice["checkpoint"] = os.path.abspath(os.fspath(checkpoint))
            if model_id is None:
                choice["model_id"] = ""
        if device is not None:
            choice["device"] = device
        if trusted is not None:
            choice["trusted"] = bool(trusted)
        if choice != self._model_choice:
            self._model_choice = choice
            if self._model_key == "given":  # a network given to use_model() is replaced by the new choice
                self._model_key = None

    def use_model(self, model: Any, label: str) -> None:
        """Use an already built network (e.g. from ``MAISSegmentLib.build_model``) until :meth:`select_model`
        chooses another one. A segment made with other weights asks before its next update rewrites it
        (:class:`RewriteNeeded`); its clicks are then replayed with this network."""
        self._replace_model(model, "given", label)

    def _replace_model(self, model: Any, key: Any, label: str) -> None:
        """Switch the network (may run on the worker: it touches no target; each target notices the switch at its
        next update, on the worker for that target, see :meth:`_compute_update`)."""
        self._model, self._model_key, self.model_label = model, key, label
        self._loaded_choice = dict(self._model_choice)

    def ensure_model(self) -> Any:
        """The selected network, loaded if needed (worker thread is fine). Changing it drops the sessions: they are
        rebuilt from their stored states (the clicks replayed with the new model) at the next point.

        Raises:
            MAISSegmentError: no model selected and no default registered. CheckpointError/WeightsError: the weight
            file is missing or damaged (messages from MAISSegmentLib).
        """
        if self.model_loaded:
            return self._model
        choice = dict(self._model_choice)
        key = self._choice_key(choice)
        self.ensure_dependencies()
        from MAISSegmentLib import build_model
        from MAISSegmentLib.errors import MAISError, is_out_of_memory

        try:
            path, label = self._checkpoint_of(choice)
            model = build_model(
                None, checkpoint=path, device=choice["device"], trusted=choice["trusted"], precision="auto"
            )
        except MAISSegmentError:
            self._keep_loaded_model()
            raise
        except Exception as exc:
            if not isinstance(exc, (MAISError, OSError)) and not is_out_of_memory(exc):
                raise
            kept = self._keep_loaded_model()
            wanted = choice["model_id"] or os.path.basename(os.fspath(choice["checkpoint"] or ""))
            text = _("The model '{model}' cannot be used: {error}").format(model=wanted, error=exc)
            if is_out_of_memory(exc):
                text += " " + _("There is not enough memory for it: choose the CPU device or a smaller model.")
            if kept:
                text += " " + _("Still using '{model}'.").format(model=self.model_label)
            raise MAISSegmentError(text) from exc
        self._replace_model(model, key, label or os.path.basename(os.fspath(path)))
        return model

    def _keep_loaded_model(self) -> bool:
        """After a failed load: go back to the model in use (if any), so the next point still works. Returns
        whether there is one."""
        if self._model is None or self._loaded_choice is None:
            return False
        self._model_choice = dict(self._loaded_choice)
        choice = self._model_choice
        if self._model_key != "given":
            self._model_key = self._choice_key(choice)
        return True

    def _checkpoint_of(self, choice: dict[str, Any]) -> tuple[str, str]:
        """``(weight file, model id or "")`` of a model choice (the registry's default when nothing is chosen).

        Raises:
            MAISSegmentError: nothing chosen and no default. WeightsError: the file is missing or damaged.
        """
        from MAISSegmentLib import weights

        if choice["checkpoint"] is not None:
            return choice["checkpoint"], choice["model_id"]
        label = choice["model_id"] or weights.default_model_id() or ""
        if not label:
            raise MAISSegmentError(
                _(
                    "No model is selected and none is built in yet: import a weight file (e.g. "
                    "sam_med3d_turbo.pth) with 'Import weights…' and select it."
                )
            )
        entry = weights.get_model(label)
        if entry.status == "not downloaded":
            how = _("press Download next to the model list, or ") if entry.builtin and entry.url else ""
            raise MAISSegmentError(
                _(
                    "The model '{model}' is not on this computer yet: {how}use 'Import weights…' with its file "
                    "({file})."
                ).format(model=label, how=how, file=entry.file)
            )
        return os.fspath(weights.resolve(label)), label

    @property
    def current_model_id(self) -> str:
        """The id of the model chosen now ("" for a weight file chosen by path, or the registry default)."""
        return self._model_choice["model_id"]

    def import_weights(self, path: str, model_id: str | None = None) -> str:
        """Copy a local weight file into the weight cache and register it (offline sites). Returns its model id."""
        self.ensure_dependencies()
        from MAISSegmentLib import weights

        entry = weights.import_weights(path, id=model_id or None, trusted=self._model_choice["trusted"])
        for note in entry.notes:
            logging.info("MAISSegment: %s", note)
        return entry.id
