"""The include (+) / exclude (−) point lists of a segment and how they map onto the session's clicks (no Qt).

Click ``n`` of a session is a control point carrying ``mais:order=n`` (``MAISSegmentLib.mrml_markups``).
:func:`plan_update` compares the session's clicks with the points (:class:`UpdatePlan`: add, forget or rebuild);
:class:`PointListsMixin` finds or creates a segment's two point lists (``get_point_lists``), picks the point "Forget"
removes (``selected_point``) and makes the point lists show the session's clicks after an update, undo or redo
(``_sync_points``).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
from slicer.i18n import tr as _

from .constants import (
    EXCLUDE_COLOR,
    INCLUDE_COLOR,
    POINTS_ROLE_ATTRIBUTE,
    POINTS_SEGMENT_ATTRIBUTE,
    POINTS_SEGMENTATION_REFERENCE,
    ROLES,
    SAME_POSITION_MM,
)
from .dependencies import add_library_path
from .records import _Target


@dataclass(frozen=True)
class UpdatePlan:
    """What to do with a session so that its clicks become the points' clicks.

    kind: ``"none"``, ``"add"`` (``clicks`` are new, appended in order), ``"forget"`` (remove session click ``index``)
    or ``"rebuild"`` (``clicks`` is the whole new list: a point moved, changed side, or several changed).
    """

    kind: str
    clicks: tuple[tuple[tuple[float, float, float], bool], ...] = ()
    index: int = -1


def _click_pair(click: Any) -> tuple[tuple[float, float, float], bool]:
    """``(ras, include)`` of a session Click or of a ``(ras, include)`` pair."""
    ras, include = (click.ras, click.include) if hasattr(click, "ras") else click
    return (float(ras[0]), float(ras[1]), float(ras[2])), bool(include)


def plan_update(session_clicks: Sequence[Any], point_clicks: Sequence[Any], tolerance_mm: float = SAME_POSITION_MM):
    """Compare a session's clicks with the clicks read from the point lists and say what to do (:class:`UpdatePlan`).

    Args:
        session_clicks: the session's clicks (``Click`` objects or ``(ras, include)`` pairs), in order.
        point_clicks: ``(ras (3,) mm, include)`` pairs from ``mrml_markups.clicks_from_markups``, in click order.
        tolerance_mm: positions closer than this on every axis are the same click.
    """
    old = [_click_pair(c) for c in session_clicks]
    new = [_click_pair(c) for c in point_clicks]

    def same(a, b) -> bool:
        return a[1] == b[1] and max(abs(x - y) for x, y in zip(a[0], b[0])) <= tolerance_mm

    prefix = 0
    while prefix < min(len(old), len(new)) and same(old[prefix], new[prefix]):
        prefix += 1
    if prefix == len(old) == len(new):
        return UpdatePlan("none")
    if prefix == len(old):
        return UpdatePlan("add", tuple(new[prefix:]))
    if len(new) == len(old) - 1 and all(same(old[i + 1], new[i]) for i in range(prefix, len(new))):
        return UpdatePlan("forget", index=prefix)
    return UpdatePlan("rebuild", tuple(new))


def _add_state_points(state: dict, include_node: Any, exclude_node: Any) -> None:
    """Add the clicks of a stored session state to the point lists, with their click orders."""
    add_library_path()
    from MAISSegmentLib.mrml_markups import add_click_point
    from MAISSegmentLib.mrml_volumes import BridgeError

    for order, click in enumerate(state.get("clicks") or []):
        try:
            node = include_node if bool(click["include"]) else exclude_node
            if node is not None:
                add_click_point(node, [float(x) for x in click["ras"]], order)
        except (KeyError, TypeError, ValueError, BridgeError):
            logging.warning("MAISSegment: skipping a malformed stored click %r", click)


def _defined_points(nodes: dict[bool, Any]) -> dict[tuple[bool, str], dict[str, Any]]:
    """The placed points of ``{include: point list node or None}``, keyed by ``(include, control point ID)``:
    ``{"id", "ras" (3,) world RAS mm, "order" (mais:order or None)}``. Points being placed are skipped."""
    add_library_path()
    from MAISSegmentLib.mrml_markups import click_order

    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    points: dict[tuple[bool, str], dict[str, Any]] = {}
    for side, node in nodes.items():
        for i in range(node.GetNumberOfControlPoints() if node is not None else 0):
            if node.GetNthControlPointPositionStatus(i) != defined:
                continue
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, position)
            point_id = node.GetNthControlPointID(i)
            points[(side, point_id)] = {"id": point_id, "ras": np.asarray(position), "order": click_order(node, i)}
    return points


class PointListsMixin:
    """The logic's point lists and their sync with the sessions' clicks (see the module docstring)."""

    @staticmethod
    def _point_lists_in_scene(scene: Any) -> list[Any]:
        nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
        nodes.UnRegister(None)  # the collection is returned with a reference owned by the caller (as slicer.util does)
        found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        return [n for n in found if n.GetAttribute(POINTS_ROLE_ATTRIBUTE) in ROLES]

    def get_point_lists(self, segmentation_node: Any, segment_id: str, create: bool = True) -> tuple[Any, Any]:
        """The include (+) and exclude (−) point lists of a segment, created (green and red) if missing.

        The lists carry the attributes ``MAISSegment.Role`` / ``MAISSegment.SegmentID`` and a node reference to the
        segmentation, so they are found again after the scene is saved and reloaded. The point lists of the other
        segments are hidden.
        """
        self._check_segment(segmentation_node, segment_id)
        scene = segmentation_node.GetScene()
        lists: dict[str, Any] = {}
        for node in self._point_lists_in_scene(scene):
            mine = (
                node.GetAttribute(POINTS_SEGMENT_ATTRIBUTE) == segment_id
                and node.GetNodeReferenceID(POINTS_SEGMENTATION_REFERENCE) == segmentation_node.GetID()
            )
            if mine:
                lists.setdefault(node.GetAttribute(POINTS_ROLE_ATTRIBUTE), node)
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(bool(mine))
        if create:
            segment_name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
            for role, color, sign in (("include", INCLUDE_COLOR, "+"), ("exclude", EXCLUDE_COLOR, "-")):
                if role in lists:
                    continue
                name = (_("{segment} include points") if role == "include" else _("{segment} exclude points")).format(
                    segment=segment_name
                )
                node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
                node.CreateDefaultDisplayNodes()
                node.SetAttribute(POINTS_ROLE_ATTRIBUTE, role)
                node.SetAttribute(POINTS_SEGMENT_ATTRIBUTE, segment_id)
                node.SetNodeReferenceID(POINTS_SEGMENTATION_REFERENCE, segmentation_node.GetID())
                node.SetMarkupLabelFormat(f"{sign}%d")
                display = node.GetDisplayNode()
                if display is not None:
                    display.SetSelectedColor(*color)  # Slicer draws selected points (the default) in this colour
                    display.SetColor(*color)
                    if hasattr(display, "SetActiveColor"):
                        display.SetActiveColor(*[min(1.0, c + 0.2) for c in color])
                lists[role] = node
        return lists.get("include"), lists.get("exclude")

    @staticmethod
    def selected_point(include_node: Any, exclude_node: Any) -> tuple[Any, int]:
        """The point "Forget selected point" removes: ``(node, index)``, or ``(None, -1)`` if there is no point.

        The point under the mouse (the display node's active control point), else the last-clicked of the points
        selected in the point lists when not all of them are (Slicer selects new points), else the last click.
        """
        add_library_path()
        from MAISSegmentLib.mrml_markups import click_order

        nodes = [n for n in (include_node, exclude_node) if n is not None]
        for node in nodes:
            display = node.GetDisplayNode()
            active = (
                display.GetActiveControlPoint()
                if display is not None and hasattr(display, "GetActiveControlPoint")
                else -1
            )
            if 0 <= active < node.GetNumberOfControlPoints():
                return node, active
        points = [(node, i) for node in nodes for i in range(node.GetNumberOfControlPoints())]
        if not points:
            return None, -1
        selected = [(node, i) for node, i in points if node.GetNthControlPointSelected(i)]
        pool = selected if 0 < len(selected) < len(points) else points
        order = {(node.GetID(), i): click_order(node, i) for node, i in pool}
        return max(pool, key=lambda p: -1 if order[(p[0].GetID(), p[1])] is None else order[(p[0].GetID(), p[1])])

    @staticmethod
    def remove_unapplied_points(include_node: Any, exclude_node: Any) -> None:
        """Remove the points that carry no click order: placed since the last update and never applied (the user
        declined the update that would have added them). Either node may be None."""
        add_library_path()
        from MAISSegmentLib.mrml_markups import click_order

        for node in (include_node, exclude_node):
            if node is None:
                continue
            for index in reversed(range(node.GetNumberOfControlPoints())):
                if click_order(node, index) is None:  # placed now, never applied
                    node.RemoveNthControlPoint(index)

    def _sync_points(self, target: _Target, seen: dict | None = None) -> None:
        """Make the point lists show the session's clicks: click ``n`` is a point carrying ``mais:order=n``.

        Points that match a click (same side, same position) are kept; a point carrying the order of a click that
        moved is moved back; other points (refused, undone) are removed and missing clicks (redone) are added.
        Points being placed (position not yet defined) are left alone, and so are, when ``seen`` (the points an
        update was computed from, :attr:`UpdateRequest.seen`) is given, the points placed or moved since: the user
        made them while the network ran, and the next update takes them in.
        """
        nodes = {True: self._node(target, target.include_node_id), False: self._node(target, target.exclude_node_id)}
        if nodes[True] is None and nodes[False] is None:
            return
        add_library_path()
        from MAISSegmentLib.mrml_markups import add_click_point, click_order, set_click_order

        clicks = [_click_pair(c) for c in target.session.clicks] if target.session is not None else []
        existing: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        # control point IDs are unique within a point list only: points are keyed by (side, ID)
        used: set[tuple[bool, str]] = set()
        later: set[tuple[bool, str]] = set()  # placed or moved since the update was prepared: the next update's
        matched: dict[int, str] = {}  # click index -> ID of its point (on the click's side)
        for (side, point_id), point in _defined_points(nodes).items():
            before = None if seen is None else seen.get((side, point_id))
            if seen is None or (before is not None and np.max(np.abs(point["ras"] - before)) <= SAME_POSITION_MM):
                existing[side].append(point)
                continue
            later.add((side, point_id))
            n = point["order"]
            if before is not None and n is not None and n < len(clicks) and clicks[n][1] == side:
                matched[n] = point_id  # a moved click's point stays where the user put it
        moved: dict[tuple[bool, str], tuple[float, float, float]] = {}
        for n, (ras, include) in enumerate(clicks):
            if n in matched:
                continue
            candidates = [
                p
                for p in existing[include]
                if (include, p["id"]) not in used and np.max(np.abs(p["ras"] - np.asarray(ras))) <= SAME_POSITION_MM
            ]
            if candidates:
                pick = next((p for p in candidates if p["order"] == n), candidates[0])
                used.add((include, pick["id"]))
                matched[n] = pick["id"]
        for n, (ras, include) in enumerate(clicks):
            if n in matched:
                continue
            pick = next((p for p in existing[include] if (include, p["id"]) not in used and p["order"] == n), None)
            if pick is not None:
                used.add((include, pick["id"]))
                matched[n] = pick["id"]
                moved[(include, pick["id"])] = ras
        for side, node in nodes.items():
            if node is None:
                continue
            modifying = node.StartModify()
            try:
                for point in existing[side]:
                    if (side, point["id"]) not in used:
                        node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(point["id"]))
                for n, (ras, include) in enumerate(clicks):
                    if include != side:
                        continue
                    if n not in matched:
                        add_click_point(node, ras, n)
                        continue
                    if (side, matched[n]) in later:
                        continue  # moved since the update: left where the user put it, for the next update
                    index = node.GetNthControlPointIndexByID(matched[n])
                    if (side, matched[n]) in moved:
                        node.SetNthControlPointPositionWorld(index, *moved[(side, matched[n])])
                    if click_order(node, index) != n:
                        set_click_order(node, index, n)
            finally:
                node.EndModify(modifying)
