"""Inference precision (MAISSegmentLib/precision.py): bfloat16 autocast for the encoder, prompt encoder, memory and
decoder where it is faster; float32 outputs; the full-resolution head and training untouched; bad names refused."""

from __future__ import annotations

import pytest
import torch

import MAISSegmentLib.precision as precision_mod
from MAISSegmentLib import build_model
from MAISSegmentLib.errors import ConfigError
from MAISSegmentLib.model import FullResConfig, get_preset
from MAISSegmentLib.precision import resolve_precision, set_inference_precision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_fr():
    torch.manual_seed(0)
    return build_model(get_preset("sam-med3d-tiny").replace(fullres=FullResConfig())).eval()


def run_clicks(model, image, clicks=3):
    """Masks (logit > 0) of a few clicks with memory, and the dtypes of every output."""
    with torch.inference_mode():
        emb = model.encode_image(image)
        feats = model.encode_fullres(image)
        bank = model.new_memory_bank()
        prev, full, dtypes, masks = None, None, set(), []
        points = torch.tensor([[[64.0, 60.0, 70.0], [40.0, 80.0, 50.0], [70.0, 70.0, 90.0]]])
        labels = torch.tensor([[1.0, 0.0, 1.0]])
        for t in range(clicks):
            out = model.step(emb, points[:, : t + 1], labels[:, : t + 1], prev, bank, features=feats, prev_full=full)
            prev, full = out.low_res_logits, out.full_res_logits
            dtypes |= {emb.dtype, prev.dtype, full.dtype, out.iou.dtype}
            masks.append(full > 0)
    return masks, dtypes


def test_bfloat16_inference_returns_float32_and_nearly_the_same_masks(tiny_fr):
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(2))
    set_inference_precision(tiny_fr, "float32")
    ref, ref_dtypes = run_clicks(tiny_fr, image)
    try:
        assert set_inference_precision(tiny_fr, "bfloat16") == torch.bfloat16
        low, dtypes = run_clicks(tiny_fr, image)
    finally:
        set_inference_precision(tiny_fr, "float32")
    assert ref_dtypes == dtypes == {torch.float32}
    for a, b in zip(ref, low):
        agree = (a == b).float().mean().item()
        assert agree > 0.97, agree  # bfloat16 rounding moves only voxels near the threshold


def test_training_ignores_the_inference_precision(tiny_fr):
    """With autograd on (training) the step runs as the caller's autocast says, whatever ``inference_dtype`` is."""
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(3))
    points, labels = torch.tensor([[[64.0, 60.0, 70.0]]]), torch.tensor([[1.0]])
    outs = []
    for name in ("float32", "bfloat16"):
        set_inference_precision(tiny_fr, name)
        with torch.no_grad():
            emb = tiny_fr.encode_image(image)  # inference: differs between the two
        with torch.enable_grad():
            outs.append(tiny_fr.step(emb.detach(), points, labels).low_res_logits)
        outs.append(emb)
    set_inference_precision(tiny_fr, "float32")
    assert not torch.equal(outs[1], outs[3])  # the encoder did run in bfloat16 for inference
    # the same embedding through the decoder with autograd on: float32 both times -> same logits
    set_inference_precision(tiny_fr, "bfloat16")
    with torch.enable_grad():
        again = tiny_fr.step(outs[1].detach(), points, labels).low_res_logits
    set_inference_precision(tiny_fr, "float32")
    assert torch.equal(again, outs[0])


def test_auto_follows_the_cpus_native_bfloat16_and_the_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv(precision_mod.ENV_VAR, raising=False)
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    zen2 = tmp_path / "zen2"
    zen2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n")
    if precision_mod.sys.platform.startswith("linux"):
        assert precision_mod.cpu_has_native_bf16(zen4) and not precision_mod.cpu_has_native_bf16(zen2)
    assert not precision_mod.cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)  # emulated bfloat16: slower
    assert resolve_precision("auto", CPU) == torch.float32
    assert resolve_precision("bfloat16", CPU) == torch.bfloat16
    monkeypatch.setenv(precision_mod.ENV_VAR, "float32")
    assert resolve_precision("bfloat16", CPU) == torch.float32
    monkeypatch.setenv(precision_mod.ENV_VAR, "half")
    with pytest.raises(ConfigError, match="MAIS_PRECISION: precision must be one of auto, float32, bfloat16"):
        resolve_precision("auto", CPU)


def test_the_probe_measures_a_positive_ratio():
    assert precision_mod.cpu_bf16_speedup(torch.get_num_threads()) > 0


@pytest.mark.parametrize("bad", ["fp16", "", None, "Float32"])
def test_unknown_precisions_are_refused_before_anything_is_built(bad, monkeypatch):
    monkeypatch.delenv(precision_mod.ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, bfloat16"):
        build_model("sam-med3d-tiny", precision=bad)
    with pytest.raises(ConfigError, match="not supported on MPS"):
        resolve_precision("bfloat16", torch.device("mps"))


def test_the_memorys_low_precision_weights_follow_weight_updates(tiny_fr):
    """The bfloat16 copies of the memory attention's weights are made once per set of weights: an in-place update
    (an optimizer step, load_state_dict) is seen at the next click, exactly as with no cached copies."""
    ma = tiny_fr.memory_attention
    emb = torch.randn(1, *tiny_fr.dense_pe().shape[1:], generator=torch.Generator().manual_seed(4))
    bank = tiny_fr.new_memory_bank()
    with torch.inference_mode():
        for _ in range(2):
            bank.push(torch.randn(1, emb.shape[1]), torch.randn(emb.shape[1:]))
    pe = tiny_fr.dense_pe()

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return ma(emb, pe, bank)

    first = run()
    assert torch.equal(run(), first)  # the cached copies give the same numbers
    with torch.no_grad():
        ma.mlp[2].weight.add_(0.05)
    updated = run()
    ma.__dict__.pop("_low_precision", None)  # no cache: copies made afresh
    assert torch.equal(run(), updated) and not torch.equal(updated, first)
