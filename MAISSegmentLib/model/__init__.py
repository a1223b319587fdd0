"""Network parts of MAIS: SAM-Med3D backbone (encoder, prompt encoder, decoder) + memory attention."""

from .config import (
    PRESETS,
    FullResConfig,
    ImageEncoderConfig,
    MaskDecoderConfig,
    MemoryConfig,
    ModelConfig,
    PromptEncoderConfig,
    get_preset,
)
from .mais import MAISModel, StepOutput

__all__ = [
    "PRESETS",
    "FullResConfig",
    "ImageEncoderConfig",
    "MAISModel",
    "MaskDecoderConfig",
    "MemoryConfig",
    "ModelConfig",
    "PromptEncoderConfig",
    "StepOutput",
    "get_preset",
]
