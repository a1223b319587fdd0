"""Checkpoint reading, identification, strict loading and atomic saving (``MAISSegmentLib.checkpoint``).

Every file is built here with ``torch.save`` from the tiny reference state dict (``ref_tiny.pth``), so the
whole module runs in a few seconds on CPU. The 100M-parameter ``sam-med3d-vit-b`` is never instantiated.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import pickle
import random
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from MAISSegmentLib import CheckpointError, MAISError, UntrustedCheckpointError, build_model, save_checkpoint
from MAISSegmentLib import checkpoint as checkpoint_module
from MAISSegmentLib.checkpoint import FORMAT, FORMAT_VERSION, state_dict_sha256
from MAISSegmentLib.model.config import MemoryConfig, get_preset
from MAISSegmentLib.model.mais import MEMORY_PREFIX

TINY_PRESET = "sam-med3d-tiny"
REPO = Path(__file__).resolve().parents[1]


class NotPlainData:
    """A custom class: unpickling it needs this module's code, so the safe loader must refuse it."""

    def __init__(self, value: int = 3) -> None:
        self.value = value


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def ref_sd() -> dict[str, torch.Tensor]:
    sd = torch.load(TINY / "ref_tiny.pth", map_location="cpu", weights_only=True)
    assert len(sd) > 100 and not any(k.startswith(MEMORY_PREFIX) for k in sd)
    return dict(sd)


def assert_weights_equal(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    msd = model.state_dict()
    for k, v in sd.items():
        assert k in msd, k
        assert torch.equal(msd[k], v), f"weight {k} differs from the checkpoint"


def sam_med3d_training_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """What SAM-Med3D's train.py writes: weights plus optimizer/scheduler state, losses and args."""
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=8e-5)
    net(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [120, 180])
    sched_state = sched.state_dict()
    assert isinstance(sched_state["milestones"], collections.Counter)
    assert opt.state_dict()["state"], "the optimizer took a real step"
    return {
        "epoch": 5,
        "model_state_dict": sd,
        "optimizer_state_dict": opt.state_dict(),
        "lr_scheduler_state_dict": sched_state,
        "losses": [np.float64(0.5), 0.4],
        "best_dice": np.float64(0.7),
        "args": argparse.Namespace(lr=8e-5, task_name="x", multi_click=False, img_size=128),
    }


@pytest.fixture()
def forbid_unsafe_load(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every torch.load; fail on anything but weights_only=True."""
    calls: list = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        if kwargs.get("weights_only") is not True:
            raise AssertionError("unsafe unpickling (weights_only=False) was used")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def expect_error(path, *fragments: str, preset=TINY_PRESET, exc_type=CheckpointError, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        build_model(preset, checkpoint=path, **kwargs)
    msg = str(info.value)
    # tmp_path is named after the test ("test_empty_file0"): look for the fragments outside the path.
    text = msg.replace(str(path), "<path>")
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in error message: {msg}"
    return msg


def saved_model(tmp_path: Path, name: str = "mais.pth"):
    """A tiny MAIS model with distinctive weights (memory attention included), saved in our format."""
    torch.manual_seed(1234)
    model = build_model(TINY_PRESET)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / name
    digest = save_checkpoint(model, path, "mais-tiny-test", "1.2.3", {"recipe": "unit test", "epochs": 2})
    return model, path, digest


# ------------------------------------------------------------------------------- 1. SAM-Med3D files
def test_sam_med3d_training_checkpoint_loads_without_unsafe_unpickling(tmp_path, ref_sd, forbid_unsafe_load):
    path = tmp_path / "sam_med3d_epoch5.pth"
    torch.save(sam_med3d_training_checkpoint(ref_sd), path)

    model = build_model(None, checkpoint=path)

    assert forbid_unsafe_load == [True], "exactly one safe torch.load, no fallback"
    assert_weights_equal(model, ref_sd)
    rep = model.load_report
    assert rep.source == "sam-med3d"
    assert rep.memory_attention == "fresh"
    assert rep.path == str(path)
    assert not model.training


def test_numpy1_era_checkpoint_loads_safely(tmp_path, ref_sd, forbid_unsafe_load):
    """NumPy 1.x pickled np.float64 as numpy.core.multiarray.scalar; that name must stay allowed."""
    scalar = np.float64(0.0).__reduce__()[0]

    class NumPy1Pickler(pickle._Pickler):  # pure-Python pickler, so save_global can be overridden
        def save_global(self, obj, name=None):
            if obj is scalar:
                self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
                self.memoize(obj)
                return
            super().save_global(obj, name)

    path = tmp_path / "old_numpy.pth"
    ckpt = {"model_state_dict": ref_sd, "best_dice": np.float64(0.7), "args": argparse.Namespace(lr=8e-5)}
    torch.save(ckpt, path, pickle_module=types.SimpleNamespace(Pickler=NumPy1Pickler, __name__="pickle"))
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(path)

    model = build_model(TINY_PRESET, checkpoint=path)
    assert forbid_unsafe_load == [True]
    assert_weights_equal(model, ref_sd)


def test_importing_checkpoint_module_does_not_touch_deprecated_numpy_core():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error:numpy.core is deprecated:DeprecationWarning",
            "-c",
            "import MAISSegmentLib.checkpoint",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plain_state_dict_config_inferred_from_shapes(ref_sd, forbid_unsafe_load):
    model = build_model(None, checkpoint=TINY / "ref_tiny.pth")

    tiny = get_preset(TINY_PRESET)
    assert model.cfg.image_encoder == tiny.image_encoder
    assert model.cfg.prompt_encoder == tiny.prompt_encoder
    assert model.cfg.mask_decoder == tiny.mask_decoder
    assert model.cfg.memory == MemoryConfig()
    assert_weights_equal(model, ref_sd)
    rep = model.load_report
    assert rep.source == "sam-med3d" and rep.memory_attention == "fresh"
    assert any("shapes" in n for n in rep.notes), rep.notes
    assert forbid_unsafe_load == [True]


def test_legacy_non_zip_torch_file_loads(tmp_path, ref_sd):
    path = tmp_path / "legacy.pth"
    torch.save(ref_sd, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    assert_weights_equal(build_model(TINY_PRESET, checkpoint=path), ref_sd)


def test_ddp_module_prefix_is_stripped_with_a_note(tmp_path, ref_sd):
    path = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in ref_sd.items()}, "epoch": 1}, path)

    model = build_model(TINY_PRESET, checkpoint=path)

    assert_weights_equal(model, ref_sd)
    assert any("module." in n for n in model.load_report.notes), model.load_report.notes


# ------------------------------------------------------------------------------- 2. our own format
def test_maissegment_round_trip(tmp_path):
    cfg = get_preset(TINY_PRESET).replace(
        memory=MemoryConfig(
            capacity=17, variant="sparse", num_heads=8, dense_dim=16, mlp_dim=256, decoder_clicks="newest"
        )
    )
    torch.manual_seed(7)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "models" / "mais.pth"  # the folder is created
    provenance = {"recipe": "unit test", "data": ["a", "b"], "metrics": {"dice": 0.5}}
    digest = save_checkpoint(model, path, "mais-tiny-test", "1.2.3", provenance)

    torch.manual_seed(99)  # a different fresh init: only loading can make the weights match
    loaded = build_model(None, checkpoint=path)

    assert loaded.cfg == cfg
    saved_sd = model.state_dict()
    assert any(k.startswith(MEMORY_PREFIX) for k in saved_sd)
    assert loaded.state_dict().keys() == saved_sd.keys()
    assert_weights_equal(loaded, saved_sd)
    rep = loaded.load_report
    assert rep.source == "maissegment"
    assert rep.model_id == "mais-tiny-test" and rep.version == "1.2.3"
    assert rep.sha256 == digest == state_dict_sha256(saved_sd)
    assert rep.provenance == provenance
    assert rep.memory_attention == "loaded"
    assert rep.path == str(path)


def test_save_is_atomic_and_replaces_an_existing_file(tmp_path):
    path = tmp_path / "mais.pth"
    path.write_bytes(b"an older checkpoint")
    _, path, digest = saved_model(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["mais.pth"], "no temporary files are left beside the checkpoint"
    assert build_model(None, checkpoint=path).load_report.sha256 == digest

    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777), "mode follows the umask"


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "mais.pth"
    path.write_bytes(b"previous content")
    model = build_model(TINY_PRESET)

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half written")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, "m", "1")
    assert path.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["mais.pth"]


# --------------------------------------------------------------------------------------- 3. errors
def test_missing_key(tmp_path, ref_sd):
    key = "mask_decoder.iou_token.weight"
    sd = {k: v for k, v in ref_sd.items() if k != key}
    torch.save(sd, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", key, "missing", "nothing was loaded")


def test_unexpected_key(tmp_path, ref_sd):
    key = "mask_decoder.extra_head.weight"
    torch.save({**ref_sd, key: torch.zeros(3)}, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", key, "unexpected")


def test_wrong_shape(tmp_path, ref_sd):
    key = "mask_decoder.iou_token.weight"
    good = tuple(ref_sd[key].shape)
    bad = (good[0], good[1] + 2)
    torch.save({**ref_sd, key: torch.zeros(bad)}, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", key, str(bad), str(good), "shape")


def test_truncated_file(tmp_path, ref_sd):
    full = tmp_path / "full.pth"
    torch.save(sam_med3d_training_checkpoint(ref_sd), full)
    data = full.read_bytes()
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    expect_error(half, "truncated")
    expect_error(half, "truncated", preset=None)


def test_truncated_legacy_file(tmp_path, ref_sd):
    full = tmp_path / "legacy.pth"
    torch.save(ref_sd, full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "half.pth", "truncated")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_error(tmp_path / "empty.pth", "is empty", "0 bytes")


def test_text_file(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    expect_error(tmp_path / "notes.pth", "not a PyTorch checkpoint", "a text file")


def test_nifti_gz_image(tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + bytes(400)))
    expect_error(tmp_path / "ct.nii.gz", "not a PyTorch checkpoint", "a gzip file")


def test_folder(tmp_path):
    expect_error(tmp_path, "is a folder")


def test_missing_path(tmp_path):
    msg = expect_error(tmp_path / "nowhere.pth", "does not exist")
    assert str(tmp_path / "nowhere.pth") in msg


@pytest.mark.parametrize("preset", [None, TINY_PRESET])
def test_2d_sam_checkpoint(tmp_path, preset):
    sd = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "image_encoder.pos_embed": torch.zeros(1, 64, 64, 768),
    }
    torch.save(sd, tmp_path / "sam_vit_b.pth")
    expect_error(tmp_path / "sam_vit_b.pth", "2-D SAM", "(768, 3, 16, 16)", preset=preset)


def test_other_architecture(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).state_dict(), tmp_path / "mlp.pth")
    expect_error(tmp_path / "mlp.pth", "SAM-Med3D's layout", "another architecture", preset=None)
    expect_error(tmp_path / "mlp.pth", "unexpected", "0.weight", "missing")


def test_no_weights_in_file(tmp_path):
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=1.0)}, tmp_path / "meta.pth")
    expect_error(tmp_path / "meta.pth", "no model weights", "epoch")


def test_tampered_weight_with_old_sha256(tmp_path):
    _, path, digest = saved_model(tmp_path)
    payload = torch.load(path, weights_only=True)
    key = "mask_decoder.iou_token.weight"
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    assert payload["sha256"] == digest
    torch.save(payload, path)
    expect_error(path, "corrupt", "SHA-256", digest[:12], preset=None)


def test_newer_format_version(tmp_path):
    _, path, _ = saved_model(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    payload["format_version"] = 99
    torch.save(payload, path)
    expect_error(path, "format version 99", "is newer than", preset=None)


def test_invalid_stored_config(tmp_path):
    _, path, _ = saved_model(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["memory"]["variant"] = "bogus"
    torch.save(payload, path)
    expect_error(path, "invalid model configuration", "bogus", preset=None)


def test_unsafe_pickle_needs_trusted(tmp_path, ref_sd):
    path = tmp_path / "with_object.pth"
    torch.save({"model_state_dict": ref_sd, "extra": NotPlainData()}, path)

    msg = expect_error(path, "trusted=True", "NotPlainData", exc_type=UntrustedCheckpointError)
    assert "not plain data" in msg

    model = build_model(TINY_PRESET, checkpoint=path, trusted=True)
    assert_weights_equal(model, ref_sd)
    assert model.load_report.source == "sam-med3d"


def test_trusted_file_whose_code_is_gone(tmp_path, ref_sd, monkeypatch):
    name = "mais_test_vanished_module"
    module = types.ModuleType(name)

    class Gone:
        pass

    Gone.__module__, Gone.__qualname__ = name, "Gone"
    module.Gone = Gone
    monkeypatch.setitem(sys.modules, name, module)
    path = tmp_path / "pickled_model.pth"
    torch.save({"model_state_dict": ref_sd, "model": Gone()}, path)
    monkeypatch.delitem(sys.modules, name)

    expect_error(path, f"{name}.Gone", "trusted=True", exc_type=UntrustedCheckpointError)
    with pytest.raises(CheckpointError, match=name) as info:
        build_model(TINY_PRESET, checkpoint=path, trusted=True)
    assert not isinstance(info.value, UntrustedCheckpointError)


@pytest.mark.parametrize("prefix", [b"\x80", b"\x80\x02"])  # the first bytes of a pickle
@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_random_bytes_are_not_a_checkpoint_at_all(tmp_path, prefix, seed):
    path = tmp_path / "random.pth"
    path.write_bytes(prefix + random.Random(seed).randbytes(5000))
    msg = expect_error(path, "is not a PyTorch checkpoint at all", "neither a zip archive nor a pickled torch file")
    assert "trust" not in msg


@pytest.mark.parametrize("seed", [0, 2])
def test_damaged_pickle_inside_the_zip_is_corrupt_not_unsafe(tmp_path, ref_sd, seed):
    good = tmp_path / "good.pth"
    torch.save({"model_state_dict": ref_sd}, good)
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            garbage = b"\x80\x02" + random.Random(seed).randbytes(len(data))  # still starts like a pickle
            zout.writestr(name, garbage if name.endswith(".pkl") else data)
    with pytest.raises(CheckpointError, match=r"damaged|corrupt") as info:
        build_model(TINY_PRESET, checkpoint=bad)
    assert not isinstance(info.value, UntrustedCheckpointError) and "trust" not in str(info.value)


def stored_payload(tmp_path: Path, drop_memory: bool = False) -> dict:
    """The payload of a saved tiny MAISSegment checkpoint (config, weights, recorded SHA-256), to edit and save."""
    _, path, _ = saved_model(tmp_path)
    payload = torch.load(path, weights_only=True)
    if drop_memory:
        payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith(MEMORY_PREFIX)}
        payload["sha256"] = state_dict_sha256(payload["state_dict"])
    return payload


def forbid_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on any construction of the network fails the test: a refusal must come before any allocation."""

    def refuse(cfg):
        raise AssertionError(f"a network was built (image encoder {cfg.image_encoder})")

    monkeypatch.setattr(checkpoint_module, "MAISModel", refuse)


@pytest.mark.parametrize(
    ("section", "field", "value", "fragments"),
    [
        (
            "image_encoder",
            "embed_dim",
            24576,
            ["image_encoder.embed_dim 24576 in the configuration, 96 in the weights"],
        ),
        ("image_encoder", "depth", 100_000, ["image_encoder.depth 100000 in the configuration, 2 in the weights"]),
        ("mask_decoder", "transformer_mlp_dim", 1 << 20, ["mask_decoder.transformer_mlp_dim 1048576"]),
        ("memory", "mlp_dim", 1 << 20, ["memory configuration that does not match its own memory weights", "mlp"]),
    ],
)
def test_stored_config_that_lies_about_its_size_is_refused_before_building(
    tmp_path, monkeypatch, section, field, value, fragments
):
    payload = stored_payload(tmp_path)
    payload["config"][section][field] = value
    torch.save(payload, tmp_path / "liar.pth")
    forbid_building(monkeypatch)
    expect_error(tmp_path / "liar.pth", "does not match its own", *fragments, preset=None)


def test_network_bigger_than_the_available_memory_is_refused_before_building(tmp_path, monkeypatch):
    payload = stored_payload(tmp_path, drop_memory=True)  # no memory weights: that part is sized by the config
    torch.save(payload, tmp_path / "fits.pth")
    payload["config"]["memory"]["mlp_dim"] = 1 << 24  # ~1.6e9 memory-attention parameters, 6 GiB
    torch.save(payload, tmp_path / "huge.pth")
    monkeypatch.setattr(checkpoint_module, "available_memory_bytes", lambda: 1 << 30)
    assert build_model(None, checkpoint=tmp_path / "fits.pth").load_report.memory_attention == "fresh"
    forbid_building(monkeypatch)
    msg = expect_error(
        tmp_path / "huge.pth", "needs ", "GiB for its weights", "1.0 GiB of memory is available", preset=None
    )
    needed = float(msg.split("needs ")[1].split(" GiB")[0])
    assert 5.5 < needed < 7.0  # 4 bytes x (1.25 M backbone + 1.6 G memory-attention parameters)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda c: [1, 2], "it is list"),
        (lambda c: "sam-med3d-vit-b", "it is str"),
        (lambda c: {**c, "image_encoder": 5}, "image_encoder must be an object"),
        (lambda c: {**c, "mask_decoder": {**c["mask_decoder"], "iou_head_hidden_dim": -32}}, "from 1 to"),
        (lambda c: {**c, "image_encoder": {**c["image_encoder"], "mlp_ratio": "4"}}, "must be a positive number"),
        (lambda c: {**c, "image_encoder": {**c["image_encoder"], "exact_fast_windows": "yes"}}, "true or false"),
        (lambda c: {**c, "image_encoder": {**c["image_encoder"], "global_attn_indexes": ["1"]}}, "block indices"),
        (lambda c: {**c, "memory": {**c["memory"], "capacity": 1.5}}, "memory.capacity must be an integer"),
        (lambda c: {**c, "mask_decoder": {**c["mask_decoder"], "transformer_num_heads": 7}}, "not divisible"),
    ],
)
def test_malformed_stored_config_is_a_clean_error(tmp_path, edit, fragment):
    payload = stored_payload(tmp_path)
    payload["config"] = edit(payload["config"])
    torch.save(payload, tmp_path / "bad_config.pth")
    expect_error(tmp_path / "bad_config.pth", "stores an invalid model configuration", fragment, preset=None)


# ---------------------------------------------------------------------------------- 4. error types
def test_errors_are_value_errors(tmp_path):
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, MAISError)
    assert issubclass(UntrustedCheckpointError, CheckpointError)
    assert issubclass(UntrustedCheckpointError, ValueError)
    with pytest.raises(ValueError, match="does not exist"):
        build_model(TINY_PRESET, checkpoint=tmp_path / "missing.pth")
