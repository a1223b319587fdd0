"""Our backbone reproduces the original SAM-Med3D code (fixture calls A, B, C; atol 1e-4).

The fixture was produced by SAM-Med3D's own classes with a tiny configuration and perturbed weights
(``Testing/fixtures/sammed3d_tiny``, made from ``../shared/fixtures`` by ``make_sammed3d_tiny.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED, TINY, sha256_file

ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def run_reference_calls(model, image, io) -> dict[str, torch.Tensor]:
    """The fixture's call sequence (ref_tiny_config.json ``call_sequence``) on our model."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["image_embeddings"] = emb = model.image_encoder(image)
        out["dense_pe"] = pe = model.prompt_encoder.get_dense_pe()
        pts, lab = io["points"], io["labels"]
        s, d = model.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
        low, iou = model.mask_decoder(emb, pe, s, d, multimask_output=False)
        out |= {"A_sparse_embeddings": s, "A_dense_embeddings": d, "A_low_res_logits": low, "A_iou_predictions": iou}
        s, d = model.prompt_encoder(points=(pts, lab), boxes=None, masks=low)
        low, iou = model.mask_decoder(emb, pe, s, d, multimask_output=True)
        out |= {"B_sparse_embeddings": s, "B_dense_embeddings": d, "B_low_res_logits": low, "B_iou_predictions": iou}
        s, d = model.prompt_encoder(
            points=(pts[:, :1], lab[:, :1].float()), boxes=None, masks=torch.zeros(1, 1, 32, 32, 32)
        )
        low, iou = model.mask_decoder(emb, pe, s, d, multimask_output=False)
        hr = F.interpolate(low, size=(128, 128, 128), mode="trilinear", align_corners=False)
        out |= {"C_sparse_embeddings": s, "C_dense_embeddings": d, "C_low_res_logits": low, "C_iou_predictions": iou}
        out["C_highres_logits_128"] = hr
    return out


def test_fixture_files_are_the_recorded_ones(tiny_config):
    assert sha256_file(TINY / "ref_tiny.pth") == tiny_config["files"]["ref_tiny.pth"]


@pytest.mark.parametrize("exact_fast", [True, False], ids=["exact-speed-up", "padded-reference"])
def test_calls_a_b_c_match_reference(tiny_model, tiny_image, tiny_io, tiny_config, exact_fast):
    tiny_model.image_encoder.set_exact_fast_windows(exact_fast)
    ours = run_reference_calls(tiny_model, tiny_image, tiny_io)
    diffs = {k: max_diff(v, tiny_io[k]) for k, v in ours.items() if k in tiny_io}
    assert len(diffs) == 14, sorted(diffs)
    print("max abs diff per tensor:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= ATOL, diffs
    # C's 128^3 output: the high-res logits against the recorded statistics, the mask voxel by voxel.
    stats = tiny_config["tensor_stats"]["C_highres_logits_128"]
    hr = ours["C_highres_logits_128"].double()
    assert abs(hr.sum().item() - stats["sum"]) / stats["sum"] < 1e-5
    assert abs(hr.min().item() - stats["min"]) <= ATOL and abs(hr.max().item() - stats["max"]) <= ATOL
    ref_mask = np.unpackbits(tiny_io["C_binary_mask_128_packbits"].numpy())[: 128**3].astype(bool)
    our_mask = (torch.sigmoid(ours["C_highres_logits_128"]) > 0.5).numpy().ravel()
    differ = our_mask != ref_mask
    # A voxel may only flip where the logit is within float noise of the threshold.
    assert differ.sum() == 0 or np.abs(ours["C_highres_logits_128"].numpy().ravel()[differ]).max() < ATOL
    assert our_mask.sum() == int(tiny_config["tensor_stats"]["C_binary_mask_128"]["sum"]) or differ.sum() < 10


def test_textbook_relative_position_fails_the_fixture(tiny_model, tiny_image, tiny_io):
    """Proves the equivalence test can fail: the 'correct' decomposition is off by ~0.07."""
    tiny_model.set_rel_pos_variant("textbook")
    with torch.no_grad():
        emb = tiny_model.image_encoder(tiny_image)
    diff = max_diff(emb, tiny_io["image_embeddings"])
    print(f"textbook variant max abs diff: {diff:.3f}")
    assert diff > 100 * ATOL


def test_exact_speed_up_equals_padded_reference_on_random_weights():
    """Beyond the fixture: both attention paths agree on another configuration and random input."""
    from MAISSegmentLib import build_model
    from MAISSegmentLib.model.config import ImageEncoderConfig, ModelConfig

    torch.manual_seed(3)
    cfg = ModelConfig(
        image_encoder=ImageEncoderConfig(
            img_size=64, embed_dim=48, depth=3, num_heads=2, window_size=6, global_attn_indexes=(2,), out_chans=48
        ),
        memory=None,
    )
    model = build_model(cfg)
    for blk in model.image_encoder.blocks:  # non-zero relative position tables and biases
        for p in (blk.attn.rel_pos_d, blk.attn.rel_pos_h, blk.attn.rel_pos_w):
            p.data.normal_(0, 0.2)
        blk.attn.qkv.bias.data.normal_(0, 0.2)
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        fast = model.image_encoder(x)
        model.image_encoder.set_exact_fast_windows(False)
        ref = model.image_encoder(x)
    assert max_diff(fast, ref) < 1e-5


@pytest.mark.skipif(not (SHARED / "fixtures/sammed3d_tiny/ref_tiny_io.pth").exists(), reason="../shared not present")
def test_test_copy_matches_shared_fixture():
    shared = torch.load(SHARED / "fixtures/sammed3d_tiny/ref_tiny_io.pth", map_location="cpu", weights_only=True)
    ours = torch.load(TINY / "ref_tiny_io_small.pt", map_location="cpu", weights_only=True)
    for k, v in ours.items():
        if k in shared:
            assert torch.equal(v, shared[k]), k
    packed = np.packbits(shared["C_binary_mask_128"].numpy().astype(bool).ravel())
    assert np.array_equal(packed, ours["C_binary_mask_128_packbits"].numpy())
