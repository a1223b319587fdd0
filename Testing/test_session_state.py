"""Saved session states: validated field by field before a replay, tied to the weights; bounded clicks; undo
history stored compactly under a byte budget (issue 11, items 4 and 5)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.errors import ConfigError, PromptError
from MAISSegmentLib.session import MAX_CLICKS, InteractiveSession, SessionOptions, parse_state, state_weights_match
from MAISSegmentLib.weights_identity import weights_sha256
from test_session import CLICKS, make_volume, new_session


@pytest.fixture(scope="module")
def model():
    return build_model("sam-med3d-tiny", checkpoint=TINY / "ref_tiny.pth")


@pytest.fixture(scope="module")
def volume():
    return make_volume()


@pytest.fixture(scope="module")
def saved(model, volume):
    s = new_session(model, volume)
    for p, inc in CLICKS[:2]:
        s.add_click(p, inc)
    return json.loads(json.dumps(s.state())), s.mask.copy()


def edited(state, path, value):
    """A deep copy of ``state`` with the field at ``path`` (keys/indices) set to ``value`` (or deleted: ...)."""
    out = copy.deepcopy(state)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


BAD_STATES = {
    "include is a string": (("clicks", 0, "include"), "no", "'include' must be true or false"),
    "include is 1": (("clicks", 0, "include"), 1, "'include' must be true or false"),
    "click NaN": (("clicks", 0, "ras"), [float("nan"), 0.0, 0.0], "finite"),
    "click with 2 coordinates": (("clicks", 0, "ras"), [1.0, 2.0], "3 numbers"),
    "click coordinates are strings": (("clicks", 0, "ras"), ["1", "2", "3"], "3 numbers"),
    "click not an object": (("clicks", 0), [1, 2, 3], "must be an object"),
    "clicks a string": (("clicks",), "many", "clicks must be a list"),
    "max_rois 1000": (("options", "max_rois"), 1000, "max_rois must be between 1 and 125"),
    "max_new_rois_per_click 1000": (("options", "max_new_rois_per_click"), 1000, "between 0 and 8"),
    "memory_size a string": (("options", "memory_size"), "60", "memory_size must be an int"),
    "use_memory a string": (("options", "use_memory"), "no", "use_memory must be a bool"),
    "blend_margin NaN": (("options", "blend_margin"), float("nan"), "finite"),
    "unknown option": (("options", "turbo"), True, "unknown option"),
    "options missing": (("options",), ..., "no options"),
    "geometry missing": (("image",), ..., "image geometry"),
    "geometry not 4x4": (("image", "ijk_to_ras"), [[1, 0], [0, 1]], "image geometry"),
    "version a string": (("version",), "1", "version must be an integer"),
    "newer version": (("version",), 99, "newer than this MAISSegment"),
    "model id a number": (("model_id",), 7, "model_id must be a string"),
    "not a state": (("format",), "something-else", "not a MAISSegment session state"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_malformed_states_are_refused_with_a_clear_error(saved, model, volume, case):
    path, value, message = BAD_STATES[case]
    state = edited(saved[0], path, value)
    with pytest.raises(ConfigError, match=message):
        parse_state(state)
    with pytest.raises(ConfigError, match=message):
        InteractiveSession.from_state(model, volume, state)


def test_a_state_that_is_not_an_object_is_refused(model, volume):
    for bad in (None, [], "text", 3):
        with pytest.raises(ConfigError, match="not a MAISSegment session state"):
            InteractiveSession.from_state(model, volume, bad)


def test_stored_clicks_outside_the_image_are_refused_before_any_replay(saved, model, volume):
    state = edited(saved[0], ("clicks", 1, "ras"), [1.0e6, 0.0, 0.0])  # 1 km away
    runs = []
    with pytest.raises(PromptError, match=r"stored click 2 of 2: .*outside the image"):
        InteractiveSession.from_state(model, volume, state, progress=lambda *a: runs.append(a))
    assert runs == []  # refused before the first click ran


def test_too_many_clicks_are_refused_in_states_and_sessions(saved, model, volume):
    state = copy.deepcopy(saved[0])
    state["clicks"] = state["clicks"][:1] * (MAX_CLICKS + 1)
    with pytest.raises(ConfigError, match=f"at most {MAX_CLICKS}"):
        InteractiveSession.from_state(model, volume, state)
    s = new_session(model, volume)
    with pytest.raises(PromptError, match=f"at most {MAX_CLICKS} clicks"):
        s.replace_clicks([CLICKS[0]] * (MAX_CLICKS + 1))
    assert s.clicks == []


def test_long_replays_report_progress(saved, model, volume):
    seen = []
    InteractiveSession.from_state(model, volume, saved[0], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]


def test_replay_is_tied_to_the_weights_not_the_model_id(saved, model, volume):
    """Two models with the same id but other weights (every ``mais train`` run is ``mais-custom``): the state's
    SHA-256 tells them apart; ``check_model=False`` replays anyway, and the check says they differ."""
    state, mask = saved
    assert state["weights_sha256"] == weights_sha256(model)
    other = build_model("sam-med3d-tiny", checkpoint=TINY / "ref_tiny.pth")
    with torch.no_grad():
        next(other.parameters()).mul_(1.01)
    other.load_report.model_id = model.load_report.model_id
    assert not state_weights_match(state, other)
    with pytest.raises(ConfigError, match="other weights"):
        InteractiveSession.from_state(other, volume, state)
    assert InteractiveSession.from_state(other, volume, state, check_model=False).clicks
    same = InteractiveSession.from_state(model, volume, state)
    assert np.array_equal(same.mask, mask)
    old = edited(state, ("weights_sha256",), ...)  # written before the hash was recorded: the model id decides
    assert state_weights_match(old, other)


def test_options_of_the_wrong_type_are_refused():
    with pytest.raises(ConfigError, match="grow_rois must be a bool"):
        SessionOptions(grow_rois="yes")
    with pytest.raises(ConfigError, match="memory_size must be an int"):
        SessionOptions(memory_size=2.5)
    assert SessionOptions(blend_margin=8).blend_margin == 8  # an int where a float is expected is fine


def test_undo_history_is_compact_and_byte_bounded(model, volume):
    """Undo patches are compressed XOR masks: far below the 2 bytes per box voxel of full before/after copies; a byte
    budget drops the oldest operations and counts them; undo/redo still restore the exact masks."""
    s = new_session(model, volume)
    masks = [s.mask.copy()]
    boxes = []
    for p, inc in CLICKS[:4]:
        boxes.append(s.add_click(p, inc))
        masks.append(s.mask.copy())
    box_voxels = sum(int(np.prod(b.shape_kji)) for b in boxes)
    patch_bytes = sum(len(r.flipped) for r in s._undo)
    assert patch_bytes < box_voxels / 8  # under one bit per box voxel (full copies: 2 bytes)
    for expected in reversed(masks[:-1]):
        s.undo()
        assert np.array_equal(s.mask, expected)
    for expected in masks[1:]:
        s.redo()
        assert np.array_equal(s.mask, expected)
    small = new_session(model, volume, undo_bytes=1)
    for p, inc in CLICKS[:3]:
        small.add_click(p, inc)
    assert small.undo_depth == 1 and small.dropped_undo == 2  # the newest operation is always kept
    assert small.undo_nbytes > 0


def test_a_sam_med3d_file_loads_to_the_same_weights_every_time(volume):
    """Its memory attention starts fresh but from a fixed seed: a state saved with it resumes (same SHA-256, same
    mask) in another load of the file."""
    first = build_model(None, checkpoint=TINY / "ref_tiny.pth")
    assert first.load_report.memory_attention == "fresh"
    s = new_session(first, volume)
    s.add_click(*CLICKS[0])
    second = build_model(None, checkpoint=TINY / "ref_tiny.pth")
    assert weights_sha256(second) == weights_sha256(first)
    assert np.array_equal(InteractiveSession.from_state(second, volume, s.state()).mask, s.mask)
