"""MAISSegmentLib: the torch side of MAISSegment (network, memory, checkpoints, CLI).

Pure Python + torch; never imports ``slicer``, ``qt`` or ``vtk`` (only the ``mrml_*`` modules, the bridge to
Slicer, do).
"""

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError, ImageError, MAISError, PromptError, UntrustedCheckpointError
from .memory import MemoryBank
from .model import MAISModel, ModelConfig, get_preset
from .session import Click, InteractiveSession, SessionOptions
from .volume import Volume

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Click",
    "ConfigError",
    "ImageError",
    "InteractiveSession",
    "MAISError",
    "MAISModel",
    "MemoryBank",
    "ModelConfig",
    "PromptError",
    "SessionOptions",
    "UntrustedCheckpointError",
    "Volume",
    "__version__",
    "build_model",
    "get_preset",
    "load_checkpoint",
    "save_checkpoint",
]
