"""Learn from my cases: finished segmentations in a real MRML scene → exported cases → fine-tuning of the tiny model in
a background process (``MAISSegmentLib.learn_worker``) → before/after Dice-vs-clicks on a held-aside case → the new
model registered in the user registry, selectable through the logic, and switching back works. Cancel and failures
leave the model in use, the registry and the segments as they were, and no temporary files."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from slicer_headless import mrml_fixture  # noqa: F401  (provides the "mrml" fixture)
from slicer_module_stubs import module_fixture  # noqa: F401  (provides the "module" fixture)

from conftest import TINY
from MAISSegmentLib import learn, weights
from MAISSegmentLib.errors import ConfigError
from MAISSegmentLib.io import write_volume
from MAISSegmentLib.volume import Volume

# the tiny network's fastest recipe: the figures only need to exist, not to be good
FAST = {"clicks": (1, 2), "episode_clicks": 2, "tbptt": 2, "memory_size": 4, "loss_size": 32, "threads": 1}
WAIT_S = 600  # a guard against a hung worker, not a speed requirement


def ball_case(mrml, module, name: str, centre_ijk):
    """A volume like the in-Slicer test's with a ball at ``centre_ijk`` and a segmentation whose "ball" segment is
    that ball (drawn on the volume: its reference geometry)."""
    import slicer

    shape = module.MAISSegmentTest.SHAPE
    k, j, i = np.indices(shape)
    ci, cj, ck = centre_ijk
    ball = (i - ci) ** 2 + (j - cj) ** 2 + (4 * (k - ck)) ** 2 < 11**2
    image = (np.where(ball, 400, 40) + np.random.default_rng(len(name)).integers(0, 20, shape)).astype(np.int16)
    volume = mrml.add_volume(image, module.MAISSegmentTest.affine(), name)
    segmentation = mrml.add_segmentation(volume, f"{name} segmentation")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("ball", "ball")
    slicer.util.updateSegmentBinaryLabelmapFromArray(ball.astype(np.uint8), segmentation, segment_id, volume)
    return volume, segmentation, segment_id


@pytest.fixture()
def weights_dir(tmp_path, monkeypatch):
    """An empty user weight cache (the registry the new model goes into)."""
    folder = tmp_path / "weights"
    monkeypatch.setenv(weights.ENV_CACHE, str(folder))
    return folder


@pytest.fixture()
def cases(mrml, module, weights_dir):
    """Two finished cases in the scene (the second is held aside) and a logic using the tiny checkpoint."""
    made = [ball_case(mrml, module, name, c) for name, c in (("first", (30, 25, 20)), ("second", (28, 22, 19)))]
    logic = module.MAISSegmentTest.make_logic()
    return made, logic


def registry_state(folder) -> str | None:
    path = folder / weights.USER_REGISTRY
    return path.read_text() if path.exists() else None


def segment_arrays(module, made) -> list[np.ndarray]:
    return [module.MAISSegmentTest.segment_array(seg, sid, vol) for vol, seg, sid in made]


def test_learn_from_scene_cases_registers_a_version_to_switch_to_and_back(cases, module, weights_dir, mrml):
    made, logic = cases
    before_segments = segment_arrays(module, made)
    candidates = logic.learning_candidates()
    assert [(c.segmentation, c.volume, c.segments) for c in candidates] == [(seg, vol, 1) for vol, seg, _ in made]
    assert candidates[0].label == "first segmentation on first (1 segment(s))"
    base_model = logic.ensure_model()
    events = []
    run = logic.start_learning(
        [(c.volume, c.segmentation) for c in candidates], steps=2, holdout=1, on_event=events.append, **FAST
    )
    work = run.work_dir
    assert run.running and (work / "cases" / "manifest.json").is_file()
    assert run.wait(timeout=WAIT_S) == "succeeded", run.failure_message()
    result = logic.finish_learning(run)
    assert not work.exists()  # exported cases, preprocessing cache and run files are gone

    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "error" not in kinds
    assert [e["done"] for e in events if e.get("phase") == "train"] == [1, 2]
    fractions = [e["fraction"] for e in events if "fraction" in e]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and run.progress == 1.0
    assert events[0]["train_cases"] == ["first"] and events[0]["eval_cases"] == ["second"]

    assert result.model_id == "ref_tiny-ft1" and result.version.startswith("ft1-")
    assert (result.train_cases, result.eval_cases, result.steps) == (["first"], ["second"], 2)
    assert set(result.before) == set(result.after) == {"1", "2"}
    assert all(0.0 <= v <= 1.0 for v in [*result.before.values(), *result.after.values()])
    assert [row[0] for row in result.table()] == [1, 2] and result.table()[0][1] == result.before["1"]
    assert result.document["methods"]["after"]["targets"][0]["case"] == "second"
    entry = weights.get_model(result.model_id)
    assert entry.status == "imported" and entry.path == result.checkpoint and entry.path.is_file()
    assert result.model_id in [c.id for c in logic.available_models() if c.usable]
    assert logic.ensure_model() is base_model  # nothing changes until the user switches

    logic.use_learned_model(result.model_id)
    tuned = logic.ensure_model()
    assert tuned is not base_model and tuned.load_report.model_id == result.model_id
    recipe = tuned.load_report.provenance["recipe"]
    assert recipe["mode"] == "finetune" and recipe["extra"]["cases"] == ["first"] and recipe["steps"] == 2
    # the new model segments through the logic like any other
    volume, segmentation, _ = made[0]
    target = segmentation.GetSegmentation().AddEmptySegment("new", "new")
    include, exclude = logic.get_point_lists(segmentation, target)
    module.MAISSegmentTest.place(include, module.MAISSegmentTest.ras((50, 40, 30)))  # beside the (protected) ball
    update = logic.on_points_changed(segmentation, target, volume, include, exclude)
    assert update.action == "add" and result.model_id in logic.describe_details(update)
    assert all(np.array_equal(a, b) for a, b in zip(segment_arrays(module, made), before_segments))

    assert logic.can_switch_back and logic.switch_back_model() and not logic.can_switch_back
    back = logic.ensure_model()
    assert back.load_report.path == str(TINY / "ref_tiny.pth") and logic.current_model_id == ""
    assert learn.next_model_version("", TINY / "ref_tiny.pth")[0] == "ref_tiny-ft2"  # the next run's id
    assert learn.next_model_version(result.model_id, result.checkpoint)[0] == "ref_tiny-ft2"


def test_cancel_stops_the_process_and_leaves_model_registry_and_files_unchanged(cases, module, weights_dir):
    made, logic = cases
    segments = segment_arrays(module, made)
    model = logic.ensure_model()
    choice = dict(logic._model_choice)
    registry = registry_state(weights_dir)
    seen = []
    run = logic.start_learning([(v, s) for v, s, _ in made], steps=10_000, holdout=0, on_event=seen.append, **FAST)
    process, work = run._proc, run.work_dir
    deadline_polls = WAIT_S * 10
    while not any(e.get("phase") == "train" for e in seen) and run.running and deadline_polls:
        run.wait(timeout=0.1)
        deadline_polls -= 1
    assert any(e.get("phase") == "train" for e in seen), run.failure_message()  # it was training
    run.cancel()
    assert process.poll() is not None and run.state == "cancelled" and not work.exists()
    with pytest.raises(learn.LearnCancelled, match="cancelled; the model in use and the model list are unchanged"):
        logic.finish_learning(run)
    assert registry_state(weights_dir) == registry and not any(weights_dir.glob("**/*.pth"))
    assert logic.ensure_model() is model and logic._model_choice == choice
    assert all(not e.id.startswith("ref_tiny-ft") for e in weights.list_models())
    assert all(np.array_equal(a, b) for a, b in zip(segment_arrays(module, made), segments))


def test_a_failing_run_says_why_and_changes_nothing(cases, module, weights_dir, tmp_path):
    """A folder whose label map holds an image (non-integer values): the worker's own message reaches the user,
    with its exit status and the end of its error output; nothing is registered."""
    made, logic = cases
    segments = segment_arrays(module, made)
    model = logic.ensure_model()
    folder = tmp_path / "my cases"
    geometry = np.diag([1.0, 1.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_volume(Volume(rng.normal(size=(8, 9, 10)).astype(np.float32), geometry), folder / f"{name}_img.nii.gz")
        write_volume(Volume(rng.normal(size=(8, 9, 10)).astype(np.float32), geometry), folder / f"{name}_lab.nii.gz")
    registry = registry_state(weights_dir)
    run = logic.start_learning(folder=str(folder), steps=1, holdout=1, **FAST)
    work = run.work_dir
    assert run.wait(timeout=WAIT_S) == "failed"
    with pytest.raises(learn.LearnError) as info:
        logic.finish_learning(run)
    message = str(info.value)
    assert message.startswith("fine-tuning failed: ") and "non-integer values" in message
    assert "exited with status 2" in message and "last lines of its output" in message
    assert not work.exists() and registry_state(weights_dir) == registry
    assert logic.ensure_model() is model and logic.last_learn_result is None
    assert all(np.array_equal(a, b) for a, b in zip(segment_arrays(module, made), segments))


def test_bad_requests_are_refused_before_anything_starts(cases, module, weights_dir, mrml, tmp_path):
    made, logic = cases
    before = {p.name for p in Path(tempfile.gettempdir()).glob("maissegment-learn-*")}
    with pytest.raises(module.MAISSegmentError, match="Choose volumes with finished segmentations"):
        logic.start_learning([])
    empty = mrml.add_segmentation(made[0][0], "empty")
    empty.GetSegmentation().AddEmptySegment("nothing", "nothing")
    with pytest.raises(Exception, match="no painted voxels"):
        logic.start_learning([(made[0][0], made[0][1]), (made[0][0], empty)])
    with pytest.raises(Exception, match="no volume to learn from"):
        logic.start_learning([(None, made[0][1])])
    with pytest.raises(ConfigError, match="steps"):
        logic.start_learning([made[0][:2]], steps=0)
    after = {p.name for p in Path(tempfile.gettempdir()).glob("maissegment-learn-*")}
    assert after == before  # no work folder left behind
    assert registry_state(weights_dir) is None


def test_split_cases_and_model_ids(weights_dir):
    class Case:
        def __init__(self, id, split="train"):
            self.id, self.split = id, split

    a, b, c = Case("a"), Case("b"), Case("c", "test")
    assert learn.split_cases([a, b, c], holdout=1) == ([a, b], [c])  # a "test" case is held aside
    assert learn.split_cases([a, b], holdout=1) == ([a], [b])
    assert learn.split_cases([a, b], holdout=0) == ([a, b], [])
    with pytest.raises(ConfigError, match="leave nothing to learn from"):
        learn.split_cases([a, b], holdout=5)
    assert learn.family_id("sam-med3d-turbo-ft3", "x.pth") == "sam-med3d-turbo"
    assert learn.family_id("", "/some/where/My model.v2.pth") == "My-model"
    assert learn.next_model_version("sam-med3d-turbo", "x.pth")[0] == "sam-med3d-turbo-ft1"
    config = learn.LearnConfig(str(TINY / "ref_tiny.pth"), data="m.json", clicks=[1, 5], structures=["liver"])
    assert learn.LearnConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown learn option"):
        learn.LearnConfig.from_json(json.dumps({"base_checkpoint": "x", "speed": 3}))
    with pytest.raises(ConfigError, match="invalid model id"):
        learn.LearnConfig(str(TINY / "ref_tiny.pth"), model_id="no spaces").check()
    with pytest.raises(ConfigError, match="is not a file"):
        learn.LearnConfig("/no/such/model.pth").check()


@pytest.mark.parametrize(
    ("error", "status", "expected"),
    [
        (lambda: torch.OutOfMemoryError("CUDA out of memory"), 1, "not enough memory to fine-tune"),
        (lambda: ConfigError("no cases"), 2, "no cases"),
        (lambda: KeyError("boom"), 1, "KeyError: 'boom'"),
    ],
    ids=["out-of-memory", "user-error", "crash"],
)
def test_worker_reports_errors_as_an_event_and_an_exit_status(monkeypatch, capfd, tmp_path, error, status, expected):
    """The worker's contract with LearnRun, run in this process: one ``error`` event on standard output (nothing
    else there), the traceback of unexpected errors on standard error, exit status 2 for a user error, 1 else."""
    from MAISSegmentLib import learn_worker

    def run(path, emit):
        print("a library printing on stdout")  # must not reach the event stream
        raise error()

    monkeypatch.setattr(learn_worker, "run", run)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() redirects it; restored afterwards
    assert learn_worker.main([str(tmp_path / "config.json")]) == status
    out, err = capfd.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 1 and events[0]["event"] == "error" and expected in events[0]["message"]
    assert "a library printing on stdout" in err
    assert ("Traceback" in err) == (status == 1)


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell script stands in for Python")
def test_a_crashing_worker_is_reported_with_the_end_of_its_output(tmp_path, weights_dir):
    """A worker that dies without an error event (here a stand-in interpreter): the exit status and the last lines
    of its error output make the message; the work folder is removed, nothing registered."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault' >&2\nexit 139\n")
    python.chmod(0o755)
    run = learn.LearnRun(learn.LearnConfig(str(TINY / "ref_tiny.pth"), data=str(tmp_path)), python=str(python))
    run.start()
    assert run.wait(timeout=WAIT_S) == "failed"
    with pytest.raises(learn.LearnError) as info:
        run.finish()
    assert str(info.value) == (
        "fine-tuning failed (the process exited with status 139)\n"
        "last lines of its output:\nFatal Python error: Segmentation fault"
    )
    assert not run.work_dir.exists() and registry_state(weights_dir) is None
