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

SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def read_markups_points(path: str | os.PathLike) -> np.ndarray:
    """All defined control points of a ``.mrk.json`` file, in file order, as RAS mm ``(N, 3)``.

    Raises:
        PromptError: unreadable file, not a markups file, unknown coordinate system, no points.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"markups file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"{p} is not a readable markups JSON file ({exc})") from None
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list):
        raise PromptError(f"{p} is not a Slicer markups file (no 'markups' list); save the point list as .mrk.json")
    points: list[np.ndarray] = []
    for m in markups:
        system = str(m.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise PromptError(f"{p}: unknown coordinateSystem {system!r} (expected LPS or RAS)")
        if str(m.get("coordinateUnits", "mm")) != "mm":
            raise PromptError(f"{p}: coordinateUnits {m.get('coordinateUnits')!r} is not supported (mm only)")
        for cp in m.get("controlPoints") or []:
            if cp.get("positionStatus", "defined") != "defined":
                continue
            try:
                xyz = np.asarray(cp["position"], dtype=np.float64).reshape(3)
            except (KeyError, TypeError, ValueError):
                raise PromptError(f"{p}: control point {cp.get('id', '?')} has no valid 3-D position") from None
            points.append(xyz * LPS_TO_RAS if system == "LPS" else xyz)
    if not points:
        raise PromptError(f"{p} contains no defined control points")
    return np.stack(points)


def write_markups_points(
    path: str | os.PathLike,
    points_ras: np.ndarray,
    name: str = "MAIS points",
    coordinate_system: str = "LPS",
    color: tuple[float, float, float] = (0.2, 0.9, 0.2),
) -> None:
    """Write RAS points ``(N, 3)`` as a Slicer point list (``.mrk.json``) in ``coordinate_system``."""
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
    Path(path).write_text(json.dumps(doc, indent=2), encoding="utf-8")
