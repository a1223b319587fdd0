"""Network structure: SAM-Med3D layout and sizes, shapes of every part, configuration validation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from MAISSegmentLib import ConfigError, PromptError, build_model
from MAISSegmentLib.devices import resolve_device
from MAISSegmentLib.model.config import ImageEncoderConfig, ModelConfig, get_preset
from MAISSegmentLib.model.mais import MAISModel


def manifest() -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in (FIXTURES / "sammed3d_full_state_dict_manifest.tsv").read_text().splitlines())
    return {k: tuple(int(x) for x in s.strip("()").split(",") if x.strip()) for k, s in rows}


@pytest.fixture(scope="module")
def vit_b_meta() -> MAISModel:
    with torch.device("meta"):  # shapes only: no 400 MB allocation
        return MAISModel(get_preset("sam-med3d-vit-b"))


def test_vit_b_without_memory_has_exactly_the_sam_med3d_state_dict():
    with torch.device("meta"):
        model = MAISModel(get_preset("sam-med3d-vit-b").replace(memory=None))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == 324
    assert ours == manifest()


def test_vit_b_backbone_layout_and_sizes(vit_b_meta):
    ours = {k: tuple(v.shape) for k, v in vit_b_meta.sam_state_dict().items()}
    assert ours == manifest()
    extra = set(vit_b_meta.state_dict()) - set(ours)
    assert extra and all(k.startswith("memory_attention.") for k in extra)
    counts = json.loads((FIXTURES / "sammed3d_full_param_counts.json").read_text())
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        n = sum(p.numel() for p in getattr(vit_b_meta, part).parameters())
        assert n == counts[part]["params"], part
    per_block = [sum(p.numel() for p in b.parameters()) for b in vit_b_meta.image_encoder.blocks]
    assert per_block == counts["image_encoder_per_block"]
    n_mem = sum(p.numel() for p in vit_b_meta.memory_attention.parameters())
    print(f"sam-med3d-vit-b: backbone {counts['total_params']:,} + memory attention {n_mem:,} parameters")


@pytest.mark.parametrize("preset", ["sam-med3d-tiny", "mais-small"])
@pytest.mark.parametrize("batch", [1, 2])
def test_part_shapes(preset, batch):
    torch.manual_seed(0)
    model = build_model(preset)
    c, g = model.cfg.embed_dim, model.cfg.grid_size
    with torch.no_grad():
        emb = model.encode_image(torch.randn(batch, 1, 128, 128, 128))
        assert emb.shape == (batch, c, g, g, g)
        assert model.dense_pe().shape == (1, c, g, g, g)
        pts, lab = torch.randint(0, 128, (batch, 3, 3)).float(), torch.ones(batch, 3)
        sparse, dense = model.prompt_encoder(points=(pts, lab), masks=torch.zeros(batch, 1, 32, 32, 32))
        assert sparse.shape == (batch, 4, c) and dense.shape == (batch, c, g, g, g)
        for multi, m in ((False, 1), (True, 3)):
            low, iou = model.mask_decoder(emb, model.dense_pe(), sparse, dense, multimask_output=multi)
            assert low.shape == (batch, m, 32, 32, 32) and iou.shape == (batch, m)


def test_encoder_rejects_wrong_input_shape():
    model = build_model("sam-med3d-tiny")
    with pytest.raises(ValueError, match=r"\(B, 1, 128, 128, 128\)"):
        model.encode_image(torch.zeros(1, 1, 64, 64, 64))


@pytest.mark.parametrize(
    ("points", "labels", "message"),
    [
        (torch.zeros(1, 0, 3), torch.zeros(1, 0), "t >= 1"),
        (torch.zeros(1, 2, 2), torch.ones(1, 2), r"\(1, t, 3\)"),
        (torch.zeros(1, 2, 3), torch.ones(1, 3), "labels"),
        (torch.zeros(1, 2, 3), torch.tensor([[1.0, 2.0]]), "include"),
    ],
)
def test_step_rejects_bad_clicks(points, labels, message):
    model = build_model("sam-med3d-tiny")
    with pytest.raises(PromptError, match=message):
        model.step(torch.zeros(1, 48, 8, 8, 8), points, labels)


def test_config_round_trip_and_validation():
    for name in ("sam-med3d-vit-b", "mais-small", "sam-med3d-tiny"):
        cfg = get_preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="known presets"):
        get_preset("vit-h")
    with pytest.raises(ConfigError, match="window_size"):
        ModelConfig(image_encoder=ImageEncoderConfig(window_size=4))
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(image_encoder=ImageEncoderConfig(num_heads=7))
    with pytest.raises(ConfigError, match="unknown or missing"):
        ModelConfig.from_dict({"image_encoder": {"embed_dims": 3}})
    with pytest.raises(PromptError, match="no memory attention"):
        build_model(get_preset("sam-med3d-tiny").replace(memory=None)).new_memory_bank()


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
