"""The identity of a network's weights: one SHA-256 over every tensor the network computes with.

A session's mask is a deterministic function of its clicks, its options and these weights, so a saved state
records this hash and a replay with other weights is detected (a model id alone does not tell: every ``mais train``
run is ``mais-custom``, and SAM-Med3D files carry none). The hash covers the network as built, i.e. after loading,
so a memory attention initialised fresh (random) is part of it.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import state_dict_sha256

_ATTRIBUTE = "_mais_weights_sha256"


def weights_sha256(model: Any) -> str:
    """SHA-256 (hex) of ``model.state_dict()`` (names, dtypes, shapes, bytes); computed once per network object.

    The cached value is dropped when any parameter is modified in place through an optimiser step: the hash is
    keyed by the parameters' version counters, so a fine-tuned network gets a new hash.
    """
    versions = tuple(p._version for p in model.parameters())
    cached = getattr(model, _ATTRIBUTE, None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = state_dict_sha256(model.state_dict())
    object.__setattr__(model, _ATTRIBUTE, (versions, digest))
    return digest
