"""Shared fixtures: paths, the tiny reference model, its regenerated input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

TESTING = Path(__file__).resolve().parent
FIXTURES = TESTING / "fixtures"
TINY = FIXTURES / "sammed3d_tiny"
SHARED = TESTING.parents[1] / "shared"  # ../shared beside the checkout (optional)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return json.loads((TINY / "ref_tiny_config.json").read_text())


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, torch.Tensor]:
    return torch.load(TINY / "ref_tiny_io_small.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_image(tiny_config: dict, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """The fixture's 128^3 input, regenerated from its recorded seed and checked against its SHA-256."""
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(42))
    path = tmp_path_factory.mktemp("regen") / "image.pt"  # torch.save names the archive after the file
    torch.save(image, path)
    assert sha256_file(path) == tiny_config["files"]["image.pt"], "regenerated input differs from the reference"
    return image


@pytest.fixture()
def tiny_model():
    from MAISSegmentLib import build_model

    return build_model("sam-med3d-tiny", checkpoint=TINY / "ref_tiny.pth")
