"""The weights' licence: models whose weights are for research / non-commercial use only are used after the user has
accepted that once; the acceptance is kept in Slicer's settings (no Qt widgets here).

The licence of a registered model is the ``license`` text of its entry in ``Resources/models.json`` (read here
without MAISSegmentLib or torch, so the question can come before anything is installed or loaded). The built-in model
``mais-small-shared`` is research / non-commercial (its training data); MAISSegment's code is Apache-2.0.

The widget asks before the first use of such a model::

    text = weights_licence_question(model_id)          # None: nothing to accept (or accepted already)
    if text and slicer.util.confirmYesNoDisplay(text, ...):
        record_weights_licence_acceptance(model_id)

An acceptance is tied to the licence text: a model whose licence changes is asked about again.
"""

import hashlib
import json
import os
from typing import Any

from slicer.i18n import tr as _

from .constants import MODULE_DIR

SETTINGS_GROUP = "MAISSegment/AcceptedWeightsLicences"  # + "/<model id>" = fingerprint of the accepted licence text
RESTRICTED_WORDS = ("non-commercial", "noncommercial", "research")  # a licence with any of them is asked about


def registry_path() -> str | None:
    """``Resources/models.json``: beside the module file once installed, at the repository root in a checkout."""
    for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        path = os.path.join(folder, "Resources", "models.json")
        if os.path.isfile(path):
            return path
    return None


def registered_licence(model_id: str, registry: str | None = None) -> str | None:
    """The ``license`` text of a registered model (None: not registered, or the registry has none for it)."""
    path = registry or registry_path()
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        entries = json.load(fh).get("models", [])
    for entry in entries:
        if entry.get("id") == model_id:
            return entry.get("license") or None
    return None


def registered_default_model(registry: str | None = None) -> str | None:
    """The registry's default model id (the one a point uses when none is chosen in Advanced), or None."""
    path = registry or registry_path()
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh).get("default") or None


def licence_needs_acceptance(licence: str | None) -> bool:
    """Whether a licence restricts the use of the weights (research / non-commercial): then the user accepts it."""
    text = (licence or "").lower()
    return any(word in text for word in RESTRICTED_WORDS)


def licence_fingerprint(licence: str) -> str:
    """What the settings keep for an accepted licence: the start of the SHA-256 of its text."""
    return hashlib.sha256(licence.encode("utf-8")).hexdigest()[:16]


def _settings(settings: Any = None) -> Any:
    """The given settings object (``value``/``setValue``), else Slicer's user settings."""
    if settings is not None:
        return settings
    import slicer

    app = getattr(slicer, "app", None)
    if app is not None and hasattr(app, "userSettings"):
        return app.userSettings()
    import qt

    return qt.QSettings()


def weights_licence_accepted(model_id: str, licence: str, settings: Any = None) -> bool:
    """Whether the user has accepted this licence text for this model (kept in the settings)."""
    stored = _settings(settings).value(f"{SETTINGS_GROUP}/{model_id}")
    return stored is not None and str(stored) == licence_fingerprint(licence)


def record_weights_licence_acceptance(
    model_id: str, licence: str | None = None, settings: Any = None, registry: str | None = None
) -> None:
    """Remember that the user accepted the licence of ``model_id`` (its registry text when ``licence`` is None)."""
    text = licence if licence is not None else registered_licence(model_id, registry)
    if not text:
        return
    store = _settings(settings)
    store.setValue(f"{SETTINGS_GROUP}/{model_id}", licence_fingerprint(text))
    if hasattr(store, "sync"):
        store.sync()


def forget_weights_licence_acceptance(model_id: str, settings: Any = None) -> None:
    """Ask again before the next use of ``model_id`` (e.g. from the Python console)."""
    store = _settings(settings)
    store.remove(f"{SETTINGS_GROUP}/{model_id}")


def pending_weights_licence(model_id: str, settings: Any = None, registry: str | None = None) -> str | None:
    """The licence text the user must accept before ``model_id`` is used; None when there is nothing to accept
    (not a restricted licence, not a registered model, or accepted already)."""
    licence = registered_licence(model_id, registry)
    if not licence_needs_acceptance(licence):
        return None
    if weights_licence_accepted(model_id, licence, settings):
        return None
    return licence


def weights_licence_question(model_id: str, settings: Any = None, registry: str | None = None) -> str | None:
    """The question to show before the first use of ``model_id`` (Yes: :func:`record_weights_licence_acceptance`),
    or None when nothing needs accepting. Main thread (translated text)."""
    licence = pending_weights_licence(model_id, settings, registry)
    if licence is None:
        return None
    return _(
        "The weights of the model '{model}' are licensed for research and non-commercial use only:\n\n{licence}\n\n"
        "They are not a medical device and must not be used for diagnosis or treatment. Do you accept these terms? "
        "MAISSegment asks once; your answer is kept in Slicer's settings."
    ).format(model=model_id, licence=licence)
