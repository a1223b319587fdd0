"""Slicer markups point lists (``.mrk.json``) <-> clicks in RAS millimetres.

Slicer writes control point positions in the file's ``coordinateSystem`` (``"LPS"`` by default since
Slicer 4.11, ``"RAS"`` also allowed). Points whose ``positionStatus`` is not ``"defined"`` (e.g. a
point being placed) are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PromptError
from .fileutil import atomic_write_text

SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def read_markups_points(path: str | os.PathLike, max_points: int | None = None) -> np.ndarray:
    """All defined control points of a ``.mrk.json`` file, in file order, as RAS mm ``(N, 3)``.

    Args:
        path: the point list.
        max_points: refuse a file with more defined points than this (``None``: no limit).

    Raises:
        PromptError: unreadable file, not a markups file, a wrongly typed field (named in the message), unknown
            coordinate system, a position that is not three finite numbers, no points, more than ``max_points``.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"markups file {p} does not exist") from None
    except IsADirectoryError:
        raise PromptError(f"{p} is a folder; give a Slicer point list file (.mrk.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"{p} is not a readable markups JSON file ({exc})") from None
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list):
        raise PromptError(f"{p} is not a Slicer markups file (no 'markups' list); save the point list as .mrk.json")
    points: list[np.ndarray] = []
    for n, m in enumerate(markups):
        points += _markup_points(p, n, m)
        if max_points is not None and len(points) > max_points:
            raise PromptError(
                f"{p} holds more than {max_points} points; at most {max_points} clicks are applied to one object "
                "(each click is replayed on every update): keep the points that matter, or split the object"
            )
    if not points:
        raise PromptError(f"{p} contains no defined control points")
    return np.stack(points)


def _markup_points(path: Path, index: int, markup: object) -> list[np.ndarray]:
    """The defined control points of ``markups[index]`` as RAS mm ``(3,)`` arrays (see :func:`read_markups_points`)."""
    where = f"{path}: markups[{index}]"
    if not isinstance(markup, dict):
        raise PromptError(f"{where} must be an object (a point list), got {_json_type(markup)}")
    system = markup.get("coordinateSystem", "LPS")
    if not isinstance(system, str) or system.upper() not in ("LPS", "RAS"):
        raise PromptError(f"{where}: unknown coordinateSystem {system!r} (expected LPS or RAS)")
    units = markup.get("coordinateUnits", "mm")
    if units != "mm":
        raise PromptError(f"{where}: coordinateUnits {units!r} is not supported (mm only)")
    control_points = markup.get("controlPoints")
    if control_points is None:
        return []
    if not isinstance(control_points, list):
        raise PromptError(f"{where}.controlPoints must be a list of points, got {_json_type(control_points)}")
    points = []
    for k, cp in enumerate(control_points):
        field = f"{where}.controlPoints[{k}]"
        if not isinstance(cp, dict):
            raise PromptError(f"{field} must be an object with a 'position', got {_json_type(cp)}")
        if cp.get("positionStatus", "defined") != "defined":
            continue
        xyz = _position(cp.get("position"), f"{field}.position (id {cp.get('id', '?')!r})")
        points.append(xyz * LPS_TO_RAS if system.upper() == "LPS" else xyz)
    return points


def _position(value: object, field: str) -> np.ndarray:
    """A control point's ``position``: exactly three finite numbers (booleans and strings are refused)."""
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise PromptError(f"{field} must be three numbers [x, y, z] in mm, got {_short(value)}")
    xyz = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(xyz)):
        raise PromptError(f"{field} must be finite numbers, got {xyz.tolist()}")
    return xyz


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_markups_points(
    path: str | os.PathLike,
    points_ras: np.ndarray,
    name: str = "MAIS points",
    coordinate_system: str = "LPS",
    color: tuple[float, float, float] = (0.2, 0.9, 0.2),
) -> None:
    """Write RAS points ``(N, 3)`` as a Slicer point list (``.mrk.json``) in ``coordinate_system``.

    The file is replaced atomically (a complete temporary file renamed over it): an interrupted write never leaves
    half a point list, and a failed one leaves the old file as it was.
    """
    system = coordinate_system.upper()
    if system not in ("LPS", "RAS"):
        raise PromptError(f"coordinate_system must be LPS or RAS, got {coordinate_system!r}")
    pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    out = pts * LPS_TO_RAS if system == "LPS" else pts
    cps: list[dict[str, Any]] = [
        {
            "id": str(n + 1),
            "label": f"{name}-{n + 1}",
            "position": [float(x) for x in xyz],
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for n, xyz in enumerate(out)
    ]
    doc = {
        "@schema": SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": system,
                "coordinateUnits": "mm",
                "locked": False,
                "labelFormat": "%N-%d",
                "controlPoints": cps,
                "display": {"selectedColor": list(color), "color": list(color)},
            }
        ],
    }
    atomic_write_text(path, json.dumps(doc, indent=2))
