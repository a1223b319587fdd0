"""Settings and names shared by every part of the module's logic (MRML attributes, colours, defaults, limits)."""

import os

MODULE_NAME = "MAISSegment"
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder of MAISSegment.py
MIN_TORCH_VERSION = "2.5"  # torch.serialization.safe_globals, used by MAISSegmentLib.checkpoint
DEVICES = ("auto", "cpu", "cuda", "mps")  # MAISSegmentLib.devices.DEVICE_CHOICES
OVERWRITE_MODES = ("none", "visible", "all")  # MAISSegmentLib.mrml_masking.OVERWRITE_MODES
DEFAULT_MAX_LIVE_SESSIONS = 8  # segments whose session stays in memory (the others replay their clicks when used)
DEFAULT_UNDO_BUDGET_BYTES = 256 * 2**20  # undo history kept for all segments together (oldest dropped first)
SAME_POSITION_MM = 1e-3  # two clicks closer than this (mm, per axis) on the same side are the same click
INCLUDE_COLOR = (0.20, 0.80, 0.30)  # include (+) points: green
EXCLUDE_COLOR = (0.95, 0.25, 0.20)  # exclude (−) points: red
POINTS_ROLE_ATTRIBUTE = "MAISSegment.Role"  # "include" | "exclude" on the point lists this module creates
POINTS_SEGMENT_ATTRIBUTE = "MAISSegment.SegmentID"
POINTS_SEGMENTATION_REFERENCE = "MAISSegmentSegmentation"  # node reference role: point list -> segmentation node
ROLES = ("include", "exclude")
# Keyboard shortcuts of the panel (while the module is shown). Chosen not to collide with the Segment Editor's (1-0,
# Shift+1-0, Escape, Space, Z/Y, Ctrl+Z/Ctrl+Y, Q/W, / * , . < >, I) nor SlicerNNInteractive's (P, B, L, S, E, R, T, V,
# Delete), nor the slice views' (B/F, R, V, G, T, [ ] { }, arrows). Undo/redo use the Segment Editor's keys: one
# history for the points and the editor's strokes (MAISSegmentLogic.undo_last_change).
INCLUDE_KEY = "A"
EXCLUDE_KEY = "X"
FORGET_KEY = "D"
UNDO_KEYS = ("Ctrl+Z", "Z")
REDO_KEYS = ("Ctrl+Y", "Ctrl+Shift+Z", "Y")
# Slicer's default terminology entry for a segment ("Tissue", SNOMED CT 85756007) in Slicer's serialised format
# (vtkSlicerTerminologiesModuleLogic): segments MAISSegment writes into get it when they have none, so that a DICOM
# SEG export is coded. The user refines it in the segment list (double-click the colour).
DEFAULT_TERMINOLOGY_ENTRY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)
