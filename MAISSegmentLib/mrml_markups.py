"""Clicks as Slicer markups control points: the click order each point carries, and the clicks of two point lists.

A click is a control point of an include (+) or an exclude (−) point list whose description holds ``mais:order=N``
(:func:`add_click_point`, :func:`set_click_order`); :func:`clicks_from_markups` reads the clicks back in that order,
in **world** RAS millimetres (parent transforms applied, the file's LPS/RAS convention plays no role).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import slicer
import vtk

from .mrml_volumes import (
    BridgeError,
    _name,
)
from .volume import as_point3

__all__ = [
    "ORDER_PREFIX",
    "add_click_point",
    "click_order",
    "clicks_from_markups",
    "next_click_order",
    "set_click_order",
]

ORDER_PREFIX = "mais:order="  # control point description: click order

_ORDER_RE = re.compile(r"mais:order=(\d+)")


def click_order(markups_node: Any, index: int) -> int | None:
    """The click order stored on control point ``index`` (``mais:order=N`` in its description), or None."""
    match = _ORDER_RE.search(markups_node.GetNthControlPointDescription(index) or "")
    return int(match.group(1)) if match else None


def set_click_order(markups_node: Any, index: int, order: int) -> None:
    """Store ``order`` on control point ``index`` (replacing an earlier order, keeping the rest of the description)."""
    if int(order) < 0:
        raise BridgeError(f"a click order must be >= 0, got {order}")
    description = _ORDER_RE.sub("", markups_node.GetNthControlPointDescription(index) or "").strip()
    tag = f"{ORDER_PREFIX}{int(order)}"
    markups_node.SetNthControlPointDescription(index, f"{tag} {description}" if description else tag)


def next_click_order(*markups_nodes: Any) -> int:
    """One more than the largest click order stored on the points of these nodes (0 if none); None nodes are skipped."""
    orders = [
        order
        for node in markups_nodes
        if node is not None
        for index in range(node.GetNumberOfControlPoints())
        if (order := click_order(node, index)) is not None
    ]
    return max(orders) + 1 if orders else 0


def add_click_point(markups_node: Any, ras: Sequence[float], order: int, label: str | None = None) -> int:
    """Place a control point at world RAS ``ras`` (mm) carrying click ``order``. Returns its index.

    Raises:
        BridgeError: ``ras`` is not three finite numbers, or Slicer refused the point (e.g. a full point list).
    """
    point = as_point3(ras, BridgeError, "a click (RAS mm)")
    index = markups_node.AddControlPointWorld(vtk.vtkVector3d(*point), label or "")
    if index < 0:
        raise BridgeError(
            f"could not add a point to {_name(markups_node)} (is it locked or at its maximum number of points?)"
        )
    set_click_order(markups_node, index, order)
    return index


def clicks_from_markups(include_node: Any, exclude_node: Any) -> list[tuple[np.ndarray, bool]]:
    """The clicks of an include (+) and an exclude (−) point list, in click order, as ``(ras (3,), include)``.

    Positions are world RAS mm (parent transforms applied; the file's LPS/RAS convention plays no role). Points are
    ordered by their stored ``mais:order=N``; points without one follow, include list first, each in list order.
    Points whose position is not defined (being placed, skipped, missing) are left out. Either node may be None.
    """
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    items: list[tuple[tuple[int, int, int], np.ndarray, bool]] = []
    sequence = 0
    for node, include in ((include_node, True), (exclude_node, False)):
        if node is None:
            continue
        for index in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(index) != defined:
                continue
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            ras = np.asarray(position, dtype=np.float64)
            if not np.all(np.isfinite(ras)):
                continue
            order = click_order(node, index)
            key = (0, order, sequence) if order is not None else (1, 0, sequence)
            items.append((key, ras, include))
            sequence += 1
    items.sort(key=lambda item: item[0])
    return [(ras, include) for _, ras, include in items]
