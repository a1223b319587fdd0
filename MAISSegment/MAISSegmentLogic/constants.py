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
