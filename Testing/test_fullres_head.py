"""The full-resolution mask path (issue 12): shapes, a fresh head equals the decoder's logits upsampled, SAM-Med3D
checkpoints load unchanged with the part off and give a fresh part without a preset, the part's weights round-trip
through a MAISSegment checkpoint, and its gradients reach every parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.checkpoint import save_checkpoint
from MAISSegmentLib.model import FullResConfig, get_preset
from MAISSegmentLib.model.fullres_head import FULLRES_PREFIX, add_click_bumps, click_maps


@pytest.fixture(scope="module")
def tiny_fr():
    torch.manual_seed(0)
    return build_model(get_preset("sam-med3d-tiny").replace(fullres=FullResConfig())).eval()


def step_inputs(model):
    torch.manual_seed(1)
    image = torch.randn(1, 1, 128, 128, 128)
    points = torch.tensor([[[64.0, 60.0, 70.0], [30.0, 100.0, 5.0]]])
    labels = torch.tensor([[1.0, 0.0]])
    return image, points, labels


@pytest.mark.parametrize("hi, mid, hidden", [(4, 16, 16), (2, 8, 4)])
def test_shapes_of_features_and_logits(hi, mid, hidden):
    cfg = get_preset("sam-med3d-tiny").replace(
        fullres=FullResConfig(hi_channels=hi, mid_channels=mid, hidden_channels=hidden)
    )
    model = build_model(cfg).eval()
    image, points, labels = step_inputs(model)
    with torch.inference_mode():
        features = model.encode_fullres(image)
        assert features.mid.shape == (1, hidden, 64**3) and features.hi.shape == (1, hi, 128**3)
        out = model.step(model.encode_image(image), points, labels, features=features)
        assert out.low_res_logits.shape == (1, 1, 32, 32, 32)
        assert out.full_res_logits.shape == (1, 1, 128, 128, 128) and out.logits is out.full_res_logits
        again = model.step(
            model.encode_image(image),
            points,
            labels,
            out.low_res_logits,
            features=features,
            prev_full=out.full_res_logits,
        )
        assert again.full_res_logits.shape == (1, 1, 128, 128, 128)
        plain = model.step(model.encode_image(image), points, labels)
        assert plain.full_res_logits is None and plain.logits is plain.low_res_logits


def test_a_fresh_head_outputs_the_decoders_logits_upsampled(tiny_fr):
    """Its generated weights start at zero and the click gains too: the untrained part changes nothing but the grid."""
    image, points, labels = step_inputs(tiny_fr)
    with torch.inference_mode():
        out = tiny_fr.step(tiny_fr.encode_image(image), points, labels, features=tiny_fr.encode_fullres(image))
        up = F.interpolate(
            F.interpolate(out.low_res_logits, size=(64,) * 3, mode="trilinear"), size=(128,) * 3, mode="trilinear"
        )
    assert torch.allclose(out.full_res_logits, up, atol=1e-5)


def test_sam_med3d_files_load_unchanged_with_the_part_off_and_fresh_without_a_preset():
    off = build_model("sam-med3d-tiny", checkpoint=TINY / "ref_tiny.pth")
    assert not off.has_fullres and off.load_report.fullres_head == "absent"
    assert not any(k.startswith(FULLRES_PREFIX) for k in off.state_dict())
    imported = build_model(None, checkpoint=TINY / "ref_tiny.pth")
    assert imported.has_fullres and imported.load_report.fullres_head == "fresh"
    assert any("full-resolution head" in note for note in imported.load_report.notes)
    again = build_model(None, checkpoint=TINY / "ref_tiny.pth")  # fixed seed: the same network at every load
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), again.state_dict().values()))
    backbone = imported.sam_state_dict()
    assert backbone.keys() == off.sam_state_dict().keys()
    assert all(torch.equal(backbone[k], v) for k, v in off.sam_state_dict().items())


def test_the_part_round_trips_through_a_maissegment_checkpoint(tiny_fr, tmp_path):
    with torch.no_grad():
        tiny_fr.fullres_head.click_gain.fill_(2.5)
        tiny_fr.fullres_head.hyper_hi.weight.normal_()
    path = tmp_path / "fr.pth"
    save_checkpoint(tiny_fr, path, model_id="fr-test", version="1")
    loaded = build_model(None, checkpoint=path)
    assert loaded.load_report.fullres_head == "loaded" and loaded.cfg.fullres == tiny_fr.cfg.fullres
    for k, v in tiny_fr.state_dict().items():
        if k.startswith(FULLRES_PREFIX):
            assert torch.equal(loaded.state_dict()[k], v), k


def test_gradients_reach_every_parameter_of_the_head(tiny_fr):
    head = tiny_fr.fullres_head
    with torch.no_grad():
        head.hyper_mid.weight.normal_(0, 0.1)
        head.hyper_hi.weight.normal_(0, 0.1)
    head.zero_grad()
    image, points, labels = step_inputs(tiny_fr)
    features = head.encode(image)
    token = torch.randn(1, tiny_fr.cfg.embed_dim)
    low = torch.randn(1, 1, 32, 32, 32)
    out = head(features, low, token, points, labels, prev_full=torch.randn(1, 1, 128, 128, 128))
    out.sigmoid().mean().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_clicks_act_exactly_where_they_are_placed():
    """Click maps peak at the click's voxel; the click bumps change the logits only in a small window around it."""
    points = torch.tensor([[[10.0, 20.0, 30.0], [100.0, 5.0, 64.0]]])
    labels = torch.tensor([[1.0, 0.0]])
    include, exclude = click_maps(points, labels, 128, 128, 1.0, torch.float32)
    assert include[0, 0, 10, 20, 30] == 1 and exclude[0, 0, 100, 5, 64] == 1
    assert include[0, 0, 100, 5, 64] == 0 and exclude[0, 0, 10, 20, 30] == 0
    logits = torch.zeros(1, 1, 128, 128, 128)
    with torch.no_grad():
        bumped = add_click_bumps(logits.clone(), points, labels, torch.tensor([3.0, 2.0]), 1.5)
    assert bumped[0, 0, 10, 20, 30] == pytest.approx(3.0) and bumped[0, 0, 100, 5, 64] == pytest.approx(-2.0)
    changed = (bumped != 0).nonzero()[:, 2:]  # (n, 3) voxel indices
    near = torch.minimum(
        (changed - torch.tensor([10, 20, 30])).abs().amax(1), (changed - torch.tensor([100, 5, 64])).abs().amax(1)
    )
    assert 0 < changed.shape[0] <= 2 * 11**3 and near.max() <= 5  # a window of 3 sigma around each click


def test_the_session_composes_the_mask_from_the_full_resolution_logits():
    """With the head, the session's mask comes from the 128^3 logits (4 MB float16 per ROI state), and an exclude
    click whose bump outweighs the decoder removes the click's own voxel."""
    import numpy as np

    from MAISSegmentLib.session import InteractiveSession, SessionOptions
    from test_session import make_volume

    torch.manual_seed(0)
    model = build_model(get_preset("sam-med3d-tiny").replace(fullres=FullResConfig())).eval()
    volume = make_volume(spacing=(1.5, 1.5, 1.5), shape_kji=(60, 70, 80))
    session = InteractiveSession(model, SessionOptions(grow_rois=False))
    session.set_image(volume)
    centre = volume.ijk_to_ras_points(np.array([[40.0, 35.0, 30.0]]))[0]
    session.add_click(centre, True)
    roi_state = session._rois[0]
    assert roi_state.full is not None and roi_state.full.shape == (1, 1, 128, 128, 128)
    with torch.no_grad():
        model.fullres_head.click_gain.copy_(torch.tensor([0.0, 1.0e4]))
    probe = volume.ijk_to_ras_points(np.array([[44.0, 35.0, 30.0]]))[0]  # 6 mm from the include click
    session.add_click(probe, False)
    assert session.mask[30, 35, 44] == 0  # the exclude click's own voxel
    from MAISSegmentLib.roi import image_box, roi_logits_on_grid

    roi_state = session._rois[0]
    values, weights = roi_logits_on_grid(roi_state.full, roi_state.roi, volume, image_box(volume))
    assert np.array_equal(session.mask > 0, (values > 0) & (weights > 0))  # composed from the 128^3 logits


# the per-click loops the vectorised click maps and bumps replaced (the reference they must equal)
def _reference_window(centre, radius, size):
    c = centre.round().long().clamp(0, size - 1)
    lo = [int(max(0, c[d] - radius)) for d in range(3)]
    hi = [int(min(size, c[d] + radius + 1)) for d in range(3)]
    return lo, hi, [torch.arange(lo[d], hi[d], dtype=torch.float32) - centre[d] for d in range(3)]


def _reference_gaussian(offsets, sigma):
    g = [torch.exp(-(o**2) / (2 * sigma**2)) for o in offsets]
    return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def reference_click_maps(points, labels, size, roi_size, sigma):
    maps = torch.zeros(points.shape[0], 2, size, size, size)
    radius = max(1, int(3 * sigma + 0.5))
    centres = (points.float() + 0.5) * (size / roi_size) - 0.5
    for bi in range(points.shape[0]):
        for centre, label in zip(centres[bi], labels[bi]):
            lo, hi, offsets = _reference_window(centre, radius, size)
            view = maps[bi, 0 if label > 0.5 else 1, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            torch.maximum(view, _reference_gaussian(offsets, sigma), out=view)
    return maps[:, :1], maps[:, 1:]


def reference_bumps(logits, points, labels, gain, sigma):
    out = logits.clone()
    radius = max(1, int(3 * sigma + 0.5))
    for bi in range(points.shape[0]):
        for p, lab in zip(points[bi], labels[bi]):
            lo, hi, offsets = _reference_window(p.float(), radius, out.shape[-1])
            signed = gain[0] if lab > 0.5 else -gain[1]
            out[bi, 0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += signed * _reference_gaussian(offsets, sigma)
    return out


def test_vectorised_click_maps_and_bumps_equal_the_per_click_loops():
    """Clicks at the faces and corners (windows cut by the grid), repeated and overlapping clicks, both labels, a batch
    of two: the same maps (maximum of Gaussians) and bumps (sums) as adding click after click."""
    g = torch.Generator().manual_seed(5)
    points = torch.rand(2, 30, 3, generator=g) * 127
    points[0, :4] = torch.tensor([[0.0, 0.0, 0.0], [127.0, 127.0, 127.0], [0.4, 126.6, 64.0], [0.4, 126.6, 64.0]])
    labels = (torch.rand(2, 30, generator=g) > 0.4).float()
    inc, exc = click_maps(points, labels, 64, 128, 0.75, torch.float32)
    ref_inc, ref_exc = reference_click_maps(points, labels, 64, 128, 0.75)
    assert torch.equal(inc, ref_inc) and torch.equal(exc, ref_exc) and inc.amax() > 0.9 and exc.amax() > 0.9
    logits = torch.randn(2, 1, 128, 128, 128, generator=g)
    gain = torch.tensor([1.5, 2.0], requires_grad=True)
    ref = reference_bumps(logits, points, labels, gain.detach(), 1.5)
    with torch.no_grad():
        in_place = add_click_bumps(logits.clone(), points, labels, gain, 1.5)
    assert torch.allclose(in_place, ref, atol=1e-5)
    with_grad = add_click_bumps(logits, points, labels, gain, 1.5)
    assert torch.allclose(with_grad, ref, atol=1e-5)
    with_grad.sum().backward()
    assert gain.grad is not None and (gain.grad.abs() > 0).all()
