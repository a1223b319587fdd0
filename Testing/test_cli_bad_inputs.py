"""Bad input through the ``mais`` commands (issue 11): each case ends with one ``mais: error:`` line and exit status
2, before any work (no click computed, no training step), with nothing written and every input unchanged.

Every case runs the real command line (:func:`MAISSegmentLib.cli.main`, in this process: fast) on small files made
in a temporary folder; the folder's files (bytes, modification times, permissions) are compared before and after.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from MAISSegmentLib.cli import main
from MAISSegmentLib.fileutil import atomic_write_many, same_file
from MAISSegmentLib.io import write_volume
from MAISSegmentLib.markups import write_markups_points
from MAISSegmentLib.volume import Volume
from test_session import affine, phantom

GRID = affine((2.0, 2.0, 2.5), (-40.0, -40.0, -30.0))  # image grid: 40 x 40 x 24 voxels around the phantom's blob
SHAPE_KJI = (24, 40, 40)
BLOB_RAS = (10.0, -5.0, 20.0)  # centre of the phantom's bright blob (the labelled structure)


# ---------------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs, made once: image, label map, point lists, manifests, a checkpoint, a session state."""
    d = tmp_path_factory.mktemp("inputs")
    image = phantom(GRID, SHAPE_KJI)
    write_volume(Volume(image.astype(np.int16), GRID), d / "image.nii.gz")
    write_volume(Volume((image > 900).astype(np.uint8), GRID), d / "label.nii.gz")
    write_markups_points(d / "inc.mrk.json", np.array([BLOB_RAS]))
    write_markups_points(d / "exc.mrk.json", np.array([[-30.0, 15.0, 0.0]]))
    shutil.copy(TINY / "ref_tiny.pth", d / "model.pth")
    write_manifest(d / "manifest.json", "label.nii.gz")
    (d / "state.nrrd").write_text("{}")  # a --resume file whose name a label map could have
    return d


@pytest.fixture()
def root(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the inputs; outputs are written here too, so the snapshot sees every change."""
    folder = tmp_path / "in"
    shutil.copytree(source, folder)
    monkeypatch.setenv("MAIS_CACHE_DIR", str(tmp_path / "cache"))  # outside the compared folder
    monkeypatch.chdir(folder)
    return folder


def write_manifest(path: Path, label: str, image: str = "image.nii.gz") -> None:
    """One training and one test case (the same two files: enough for every command, few-shot included)."""
    cases = [
        {"id": f"c{n}", "image": image, "label": label, "labels": {"1": "blob"}, "split": split}
        for n, split in enumerate(("train", "test"))
    ]
    path.write_text(json.dumps({"version": 1, "cases": cases}))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: (kind, SHA-256 of a file's bytes, mtime in ns, permission bits)."""
    state = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        state[str(p.relative_to(folder))] = (p.is_dir(), p.is_symlink(), digest, st.st_mtime_ns, st.st_mode)
    return state


def run_refused(capsys: pytest.CaptureFixture, folder: Path, args: list[str], message: str) -> None:
    """Run ``mais ARGS``; it must exit 2 with one error line matching ``message``, compute nothing, change nothing."""
    before = snapshot(folder)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("mais: error:")]
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert len(errors) == 1 and re.search(message, errors[0]), err[-3000:]
    assert "Traceback" not in err and not re.search(r"^click \d", out, re.M), out[-2000:]
    assert "resumed at step" not in err and not re.search(r"^wrote ", out, re.M)  # no training step, no output
    assert snapshot(folder) == before


def expand(args: list[str], folder: Path) -> list[str]:
    return [a.format(d=folder) for a in args]


# ---------------------------------------------------------------------------------------------------- setups
def symlink_to_image(d: Path) -> None:
    (d / "link.nii.gz").symlink_to(d / "image.nii.gz")


def hardlink_to_image(d: Path) -> None:
    os.link(d / "image.nii.gz", d / "hard.nii.gz")


def folders(d: Path) -> None:
    (d / "dir.seg.nrrd").mkdir()
    (d / "sdir").mkdir()


def read_only_output(d: Path) -> None:
    (d / "ro.nii.gz").write_bytes(b"the user's protected result")
    (d / "ro.nii.gz").chmod(0o444)


def bad_markups(d: Path) -> None:
    docs = {
        "not_objects": {"markups": [1]},
        "cp_string": {"markups": [{"controlPoints": "abc"}]},
        "cp_item": {"markups": [{"controlPoints": ["x"]}]},
        "two_numbers": {"markups": [{"controlPoints": [{"position": [1.0, 2.0]}]}]},
        "strings": {"markups": [{"controlPoints": [{"position": ["1", "2", "3"]}]}]},
        "booleans": {"markups": [{"controlPoints": [{"position": [True, 0, 0]}]}]},
        "nan": {"markups": [{"controlPoints": [{"position": [float("nan"), 0.0, 0.0]}]}]},
    }
    for name, doc in docs.items():
        (d / f"{name}.mrk.json").write_text(json.dumps(doc))  # json writes NaN as NaN, as Python reads it back
    write_markups_points(d / "many.mrk.json", np.tile(np.array([BLOB_RAS]), (501, 1)))


def nifti_images(d: Path) -> None:
    """A float NIfTI with NaN/Inf voxels, and NIfTI headers whose voxel size (pixdim[1]) is 0, -2 or NaN."""
    image = phantom(GRID, SHAPE_KJI)
    image[3, 4, 5], image[6, 7, 8] = np.nan, np.inf
    write_volume(Volume(image, GRID), d / "nan.nii.gz")
    raw = gzip.decompress((d / "image.nii.gz").read_bytes())
    for name, value in (("zero", 0.0), ("negative", -2.0), ("nanspacing", float("nan"))):
        header = bytearray(raw)
        header[80:84] = struct.pack("<f", value)  # pixdim[1] of a little-endian NIfTI-1 header
        (d / f"{name}.nii.gz").write_bytes(gzip.compress(bytes(header)))
    (d / "notes.nii.gz").write_text("these are my notes, not an image\n")


def label_maps(d: Path) -> None:
    """Manifests whose label map is empty, 10 m away (same grid shape), or on another grid partly outside."""
    label = (phantom(GRID, SHAPE_KJI) > 900).astype(np.uint8)
    write_volume(Volume(np.zeros_like(label), GRID), d / "empty.nii.gz")
    far = GRID.copy()
    far[:3, 3] += 10_000.0
    write_volume(Volume(label, far), d / "far.nii.gz")
    shifted = affine((1.0, 1.0, 1.0), (-10.0, -20.0, 0.0))  # a finer grid whose blob reaches past the image's top
    k, j, i = np.indices((60, 40, 40))
    ras = np.stack([i, j, k, np.ones_like(i)], -1) @ shifted.T
    ball = np.linalg.norm(ras[..., :3] - [10.0, 0.0, 40.0], axis=-1) < 10
    write_volume(Volume(ball.astype(np.uint8), shifted), d / "other_grid.nii.gz")
    for name in ("empty", "far", "other_grid"):
        write_manifest(d / f"{name}.json", f"{name}.nii.gz")


def existing_run(d: Path) -> None:
    run = d / "run"
    run.mkdir()
    for name in ("last.pth", "model.pth"):
        shutil.copy(d / "model.pth", run / name)  # a release file where a training state belongs
    (run / "log.csv").write_text("step,loss\n1,0.5\n")


def few_shot_results(d: Path) -> None:
    (d / "fs").mkdir()
    (d / "fs" / "fewshot.json").write_text('{"earlier": "results"}')


# ---------------------------------------------------------------------------------------------------- mais segment
SEGMENT_CASES = [
    # (id, setup, arguments after the defaults, error message pattern)
    ("out-is-image", None, ["--out", "{d}/image.nii.gz"], r"--out .*image\.nii\.gz is the input --image"),
    ("out-is-image-symlink", symlink_to_image, ["--out", "{d}/link.nii.gz"], r"is the input --image"),
    ("out-is-image-hardlink", hardlink_to_image, ["--out", "{d}/hard.nii.gz"], r"is the input --image"),
    ("out-is-image-relative", None, ["--out", "../in/./image.nii.gz"], r"is the input --image"),
    ("state-is-include", None, ["--state", "{d}/inc.mrk.json"], r"--state .* is the input --include"),
    (
        "state-is-exclude",
        None,
        ["--exclude", "{d}/exc.mrk.json", "--state", "{d}/exc.mrk.json"],
        r"is the input --exclude",
    ),
    ("state-is-image", None, ["--state", "{d}/image.nii.gz"], r"is the input --image"),
    ("state-is-checkpoint", None, ["--state", "{d}/model.pth"], r"is the input --checkpoint"),
    ("out-is-resume", None, ["--resume", "{d}/state.nrrd", "--out", "{d}/state.nrrd"], r"is the input --resume"),
    ("out-is-state", None, ["--out", "{d}/o.nii.gz", "--state", "{d}/o.nii.gz"], r"--out and --state are the same"),
    ("out-is-a-folder", folders, ["--out", "{d}/dir.seg.nrrd"], r"is a folder"),
    ("state-is-a-folder", folders, ["--state", "{d}/sdir"], r"--state .*sdir: .* is a folder"),
    ("state-under-a-file", None, ["--state", "{d}/inc.mrk.json/s.json"], r"is a file, not a folder"),
    ("out-under-a-file", None, ["--out", "{d}/image.nii.gz/o.seg.nrrd"], r"is a file, not a folder"),
    ("out-read-only", read_only_output, ["--out", "{d}/ro.nii.gz"], r"is read-only"),
    ("markups-not-objects", bad_markups, ["--include", "{d}/not_objects.mrk.json"], r"markups\[0\] must be an obj"),
    ("markups-cp-string", bad_markups, ["--include", "{d}/cp_string.mrk.json"], r"controlPoints must be a list"),
    ("markups-cp-item", bad_markups, ["--include", "{d}/cp_item.mrk.json"], r"controlPoints\[0\] must be an obj"),
    ("markups-2-numbers", bad_markups, ["--include", "{d}/two_numbers.mrk.json"], r"position .*three numbers"),
    ("markups-strings", bad_markups, ["--include", "{d}/strings.mrk.json"], r"position .*three numbers"),
    ("markups-booleans", bad_markups, ["--include", "{d}/booleans.mrk.json"], r"position .*three numbers"),
    ("markups-nan", bad_markups, ["--include", "{d}/nan.mrk.json"], r"controlPoints\[0\]\.position .*finite"),
    ("markups-501-points", bad_markups, ["--include", "{d}/many.mrk.json"], r"more than 500 points"),
    ("device-cpu-x", None, ["--device", "cpu:x"], r"device 'cpu:x'.*device number"),
    ("device-cpu-1", None, ["--device", "cpu:1"], r"only one CPU"),
    ("device-auto-1", None, ["--device", "auto:1"], r"takes no device number"),
    ("nifti-nan-voxels", nifti_images, ["--image", "{d}/nan.nii.gz"], r"2 NaN/Inf voxels"),
    ("nifti-zero-spacing", nifti_images, ["--image", "{d}/zero.nii.gz"], r"voxel size of \(0, 2, 2\.5\) mm"),
    ("nifti-negative-spacing", nifti_images, ["--image", "{d}/negative.nii.gz"], r"voxel size of \(-2, "),
    ("nifti-nan-spacing", nifti_images, ["--image", "{d}/nanspacing.nii.gz"], r"voxel size of \(nan, "),
    ("image-is-text", nifti_images, ["--image", "{d}/notes.nii.gz"], r"holds text, not an image"),
    ("empty-label-name", None, ["--label-name", " "], r"--label-name must not be empty"),
]


@pytest.mark.parametrize(
    ("setup", "extra", "message"), [c[1:] for c in SEGMENT_CASES], ids=[c[0] for c in SEGMENT_CASES]
)
def test_segment_refuses(
    capsys: pytest.CaptureFixture, root: Path, setup: Callable | None, extra: list[str], message: str
) -> None:
    if setup is not None:
        setup(root)
    args = ["segment", "--image", "{d}/image.nii.gz", "--checkpoint", "{d}/model.pth", "--device", "cpu"]
    args = ["segment", *_without_replaced(args[1:], extra)]
    if "--include" not in extra and "--resume" not in extra:
        args += ["--include", "{d}/inc.mrk.json"]
    if "--out" not in extra:
        args += ["--out", "{d}/out.seg.nrrd"]
    run_refused(capsys, root, expand(args + extra, root), message)


def _without_replaced(args: list[str], extra: list[str]) -> list[str]:
    """``args`` (``--option value`` pairs) without the options ``extra`` gives again."""
    given = set(extra)
    pairs = list(zip(args[::2], args[1::2]))
    return [x for option, value in pairs if option not in given for x in (option, value)]


# ---------------------------------------------------------------------------------------------------- mais evaluate
EVALUATE_CASES = [
    ("out-is-manifest", None, ["--out", "{d}/manifest.json"], r"--out .* is the input --manifest"),
    ("out-is-label-map", None, ["--out", "{d}/label.nii.gz"], r"is the input the label map of case 'c0'"),
    ("out-is-image", None, ["--out", "{d}/image.nii.gz"], r"is the input the image of case 'c0'"),
    ("out-is-checkpoint", None, ["--out", "{d}/model.pth"], r"is the input the checkpoint of base"),
    ("out-is-png", None, ["--out", "{d}/result.png"], r"give the result a \.json name"),
    ("out-is-a-folder", folders, ["--out", "{d}/sdir"], r"is a folder"),
    ("zero-targets", label_maps, ["--manifest", "{d}/empty.json"], r"no targets in .*empty\.json"),
    (
        "label-10-m-away",
        label_maps,
        ["--manifest", "{d}/far.json"],
        r"outside the image .*about 1\d{4} mm beyond",
    ),
    ("label-other-grid-outside", label_maps, ["--manifest", "{d}/other_grid.json"], r"labelled voxels .* lie outside"),
    ("max-targets-0", None, ["--max-targets", "0"], r"--max-targets must be at least 1"),
    ("clicks-501", None, ["--clicks", "1,501"], r"at most 500 clicks per target"),
    ("device-cpu-x", None, ["--device", "cpu:x"], r"device number"),
]


@pytest.mark.parametrize(
    ("setup", "extra", "message"), [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES]
)
def test_evaluate_refuses(
    capsys: pytest.CaptureFixture, root: Path, setup: Callable | None, extra: list[str], message: str
) -> None:
    if setup is not None:
        setup(root)
    args = ["--manifest", "{d}/manifest.json", "--methods", "mais", "--checkpoint", "{d}/model.pth"]
    args += ["--clicks", "1", "--device", "cpu", "--out", "{d}/result.json"]
    run_refused(capsys, root, expand(["evaluate", *_without_replaced(args, extra), *extra], root), message)


# ---------------------------------------------------------------------------------------------------- train, finetune
TRAIN_CASES = [
    ("checkpoint-every-0", None, ["--checkpoint-every", "0"], r"checkpoint_every \(--checkpoint-every\) must be"),
    ("negative-lr", None, ["--lr-prompt-decoder", "-0.0001"], r"lr_prompt_decoder .* positive learning rate"),
    ("zero-lr-memory", None, ["--lr-memory", "0"], r"lr_memory .* positive learning rate"),
    ("nan-lr-encoder", None, ["--lr-encoder", "nan"], r"lr_encoder .* positive learning rate"),
    ("targets-per-crop-0", None, ["--targets-per-crop", "0"], r"targets_per_crop .* must be a whole number >= 1"),
    ("memory-size-0", None, ["--memory-size", "0"], r"memory_size must be between 1 and 10000.*--memory-size"),
    ("memory-size-huge", None, ["--memory-size", "20000"], r"memory_size must be between 1 and 10000"),
    ("negative-seed", None, ["--seed", "-1"], r"seed \(--seed\) must be a whole number >= 0"),
    ("negative-warmup", None, ["--warmup-steps", "-5"], r"warmup_steps .* >= 0"),
    ("negative-time-limit", None, ["--time-limit", "-1"], r"--time-limit must be zero or a positive"),
    ("cases-0", None, ["--cases", "0"], r"--cases must be at least 1"),
    ("episode-clicks-501", None, ["--episode-clicks", "501"], r"episode_clicks .* at most 500"),
    ("device-cpu-x", None, ["--device", "cpu:x"], r"device number"),
    ("out-is-a-file", None, ["--out", "{d}/image.nii.gz"], r"is a file, not a folder"),
    ("existing-run", existing_run, [], r"already holds a run .*continue it with --resume, or start again with --over"),
    ("resume-and-overwrite", existing_run, ["--resume", "--overwrite"], r"--resume .* --overwrite .* give only one"),
    ("resume-a-release-file", existing_run, ["--resume"], r"model weights only, without the optimizer state"),
    ("label-10-m-away", label_maps, ["--manifest", "{d}/far.json"], r"lie outside the image"),
    (
        "finetune-overwrite-its-checkpoint",
        existing_run,
        ["finetune", "--checkpoint", "{d}/run/model.pth", "--overwrite"],
        r"--out model\.pth .* is the input --checkpoint",
    ),
]


@pytest.mark.parametrize(("setup", "extra", "message"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses(
    capsys: pytest.CaptureFixture, root: Path, setup: Callable | None, extra: list[str], message: str
) -> None:
    if setup is not None:
        setup(root)
    command, extra = (extra[0], extra[1:]) if extra[:1] == ["finetune"] else ("train", extra)
    args = ["--manifest", "{d}/manifest.json", "--steps", "2", "--batch-size", "1", "--episode-clicks", "2"]
    args += ["--tbptt", "2", "--device", "cpu", "--out", "{d}/run"]
    if command == "train":
        args += ["--preset", "sam-med3d-tiny"]
    flags = [a for a in extra if a in ("--resume", "--overwrite")]
    options = [a for a in extra if a not in flags]
    run_refused(capsys, root, expand([command, *_without_replaced(args, options), *options, *flags], root), message)


# ---------------------------------------------------------------------------------------------------- mais fewshot
FEWSHOT_CASES = [
    ("cases-0", None, ["--cases", "0,1"], r"numbers of training cases must be >= 1"),
    ("negative-lr", None, ["--lr-prompt-decoder", "-1"], r"positive learning rate"),
    ("clicks-501", None, ["--clicks", "1,501"], r"at most 500 clicks per target"),
    ("existing-results", few_shot_results, [], r"already holds few-shot results \(fewshot\.json\).*--overwrite"),
    ("out-is-manifest-folder-file", None, ["--out", "{d}/manifest.json"], r"is a file, not a folder"),
]


@pytest.mark.parametrize(
    ("setup", "extra", "message"), [c[1:] for c in FEWSHOT_CASES], ids=[c[0] for c in FEWSHOT_CASES]
)
def test_fewshot_refuses(
    capsys: pytest.CaptureFixture, root: Path, setup: Callable | None, extra: list[str], message: str
) -> None:
    if setup is not None:
        setup(root)
    args = ["--checkpoint", "{d}/model.pth", "--manifest", "{d}/manifest.json", "--structures", "blob"]
    args += ["--cases", "1", "--steps", "1", "--episode-clicks", "2", "--clicks", "1", "--out", "{d}/fs"]
    run_refused(capsys, root, expand(["fewshot", *_without_replaced(args, extra), *extra], root), message)


# ---------------------------------------------------------------------------------------------------- mais demo
def read_only_folder(d: Path) -> None:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)


def demo_outputs_in_the_way(d: Path) -> None:
    """In the demo's --out folder: a folder where the .seg.nrrd goes, a read-only file where the plot goes."""
    (d / "demo" / "liver.seg.nrrd").mkdir(parents=True)
    (d / "demo" / "dice_vs_clicks.png").write_bytes(b"the user's earlier plot")
    (d / "demo" / "dice_vs_clicks.png").chmod(0o444)


DEMO_CASES = [
    ("out-is-a-file", None, ["--out", "{d}/image.nii.gz"], r"--out .*image\.nii\.gz: .* is a file, not a folder"),
    ("out-is-the-checkpoint", None, ["--out", "{d}/model.pth"], r"is a file, not a folder"),
    ("out-under-a-file", None, ["--out", "{d}/image.nii.gz/demo"], r"is a file, not a folder"),
    ("out-read-only-folder", read_only_folder, ["--out", "{d}/ro"], r"cannot write into the folder .*ro: no permiss"),
    ("out-under-read-only", read_only_folder, ["--out", "{d}/ro/demo"], r"cannot write into the folder .*ro: no perm"),
    ("seg-nrrd-is-a-folder", demo_outputs_in_the_way, ["--out", "{d}/demo"], r"--out .*liver\.seg\.nrrd is a folder"),
    (
        "plot-read-only",
        demo_outputs_in_the_way,
        ["--out", "{d}/demo", "--structure", "spleen"],
        r"dice_vs_clicks\.png is read-only",
    ),
    ("unknown-structure", None, ["--structure", "heart_of_gold"], r"no structure 'heart_of_gold'.*liver"),
    ("clicks-0", None, ["--clicks", "0"], r"--clicks must be between 1 and 500"),
    ("clicks-501", None, ["--clicks", "501"], r"--clicks must be between 1 and 500"),
    ("device-cpu-x", None, ["--device", "cpu:x"], r"device number"),
]


@pytest.mark.parametrize(("setup", "extra", "message"), [c[1:] for c in DEMO_CASES], ids=[c[0] for c in DEMO_CASES])
def test_demo_refuses(
    capsys: pytest.CaptureFixture,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: Callable | None,
    extra: list[str],
    message: str,
) -> None:
    if setup is not None:
        setup(root)
    real_access = os.access

    def access_as_a_user(path: os.PathLike | str, mode: int, **kwargs: object) -> bool:
        """``os.access`` as for a user who is not root (root may write into a folder whose write bits are off)."""
        if mode & os.W_OK and Path(path).is_dir() and not Path(path).stat().st_mode & 0o222:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access_as_a_user)
    args = ["--checkpoint", "{d}/model.pth", "--clicks", "1", "--device", "cpu", "--out", "{d}/demo"]
    run_refused(capsys, root, expand(["demo", *_without_replaced(args, extra), *extra], root), message)


# ---------------------------------------------------------------------------------------------------- what still works
def test_state_may_be_saved_back_to_the_resumed_file(capsys: pytest.CaptureFixture, root: Path) -> None:
    """``--state`` equal to ``--resume`` is the normal way to continue a session: not refused as an overwrite."""
    first = ["segment", "--image", "image.nii.gz", "--checkpoint", "model.pth", "--device", "cpu"]
    assert main([*first, "--point", "10,-5,20,+", "--out", "a.nii.gz", "--state", "s.json"]) == 0
    saved = json.loads((root / "s.json").read_text())
    assert main([*first, "--resume", "s.json", "--point=-30,15,0,-", "--out", "b.nii.gz", "--state", "s.json"]) == 0
    again = json.loads((root / "s.json").read_text())
    assert len(saved["clicks"]) == 1 and len(again["clicks"]) == 2
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary file left
    capsys.readouterr()


def test_a_failing_state_write_leaves_no_segmentation(
    capsys: pytest.CaptureFixture, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails only while writing (a full disk) after the clicks: neither --out nor --state appears."""
    real_fsync = os.fsync

    def disk_full_for_the_state(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".s.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_for_the_state)
    before = snapshot(root)
    args = ["segment", "--image", "image.nii.gz", "--checkpoint", "model.pth", "--device", "cpu"]
    code = main([*args, "--point", "10,-5,20,+", "--out", "out.seg.nrrd", "--state", "s.json"])
    out, err = capsys.readouterr()
    assert code == 2 and "click 1" in out, err[-2000:]
    assert re.search(r"^mais: error: cannot write .*No space left on device; nothing was written$", err, re.M), err
    assert snapshot(root) == before  # no out.seg.nrrd, no s.json, no temporary file


@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links here")
def test_same_file_sees_through_links_and_dots(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "sym.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    os.link(tmp_path / "a.nii.gz", tmp_path / "hard.nii.gz")
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    for other in ("sym.nii.gz", "hard.nii.gz", "sub/../a.nii.gz"):
        assert same_file(tmp_path / "a.nii.gz", tmp_path / other), other
    assert not same_file(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")  # equal bytes, another file
    assert same_file(tmp_path / "new.json", tmp_path / "." / "new.json")  # neither exists yet: same path


def test_atomic_write_many_replaces_all_or_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("old a")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.EIO, "input/output error")

    with pytest.raises(OSError, match="input/output error"):
        atomic_write_many([(tmp_path / "a.txt", lambda t: t.write_text("new a"), ""), (tmp_path / "b.txt", fail, "")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"
    atomic_write_many([(tmp_path / "a.txt", lambda t: t.write_text("new a"), "")])
    assert (tmp_path / "a.txt").read_text() == "new a"
