"""``mais segment`` end to end: real image and markups files in, .seg.nrrd out, resume, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.io import read_volume, write_volume
from MAISSegmentLib.markups import read_markups_points, write_markups_points
from MAISSegmentLib.seg_nrrd import read_segmentation
from MAISSegmentLib.session import InteractiveSession
from MAISSegmentLib.volume import Volume
from test_cli import mais
from test_session import affine, phantom, rotation

INCLUDE = np.array([[10.0, -5.0, 20.0], [12.0, 0.0, 14.0]])
EXCLUDE = np.array([[-30.0, 15.0, 0.0]])
CKPT = str(TINY / "ref_tiny.pth")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    m = affine((1.6, 1.4, 2.5), (-60.0, -50.0, -40.0), rotation((0, 0, 1), 12))
    vol = Volume(phantom(m, (40, 70, 80)).astype(np.int16), m)
    write_volume(vol, d / "image.nii.gz")
    write_markups_points(d / "inc.mrk.json", INCLUDE, coordinate_system="LPS")
    write_markups_points(d / "exc.mrk.json", EXCLUDE, coordinate_system="RAS")
    return d


def expected_mask(case, clicks) -> np.ndarray:
    model = build_model(None, checkpoint=CKPT, precision="auto")  # as `mais segment` builds it
    s = InteractiveSession(model)
    s.set_image(read_volume(case / "image.nii.gz"))
    for p, inc in clicks:
        s.add_click(p, inc)
    return s.mask


def test_markups_lps_and_ras_read_as_ras(case):
    assert np.allclose(read_markups_points(case / "inc.mrk.json"), INCLUDE)
    assert np.allclose(read_markups_points(case / "exc.mrk.json"), EXCLUDE)
    raw = json.loads((case / "inc.mrk.json").read_text())
    assert raw["markups"][0]["coordinateSystem"] == "LPS"
    assert np.allclose(raw["markups"][0]["controlPoints"][0]["position"], [-10.0, 5.0, 20.0])


def test_segment_writes_seg_nrrd_matching_the_session(case, tmp_path):
    out = tmp_path / "out.seg.nrrd"
    proc = mais(
        "segment",
        "--image",
        str(case / "image.nii.gz"),
        "--include",
        str(case / "inc.mrk.json"),
        "--exclude",
        str(case / "exc.mrk.json"),
        "--checkpoint",
        CKPT,
        "--out",
        str(out),
        "--label-name",
        "tumour",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("click ") == 3 and " s (encoder" in proc.stdout
    ref, segments = read_segmentation(out)
    assert [s.name for s in segments] == ["tumour"]
    image = read_volume(case / "image.nii.gz")
    assert np.allclose(ref.ijk_to_ras, image.ijk_to_ras, atol=1e-4) and ref.array.shape == image.array.shape
    expected = expected_mask(case, [(p, True) for p in INCLUDE] + [(p, False) for p in EXCLUDE])
    assert np.array_equal(segments[0].mask > 0, expected > 0) and expected.any()
    slicerio = pytest.importorskip("slicerio")
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["tumour"]


def test_resume_continues_with_full_memory(case, tmp_path):
    state = tmp_path / "state.json"
    first = mais(
        "segment",
        "--image",
        str(case / "image.nii.gz"),
        "--point",
        "10,-5,20,+",
        "--point",
        "-30,15,0,-",
        "--checkpoint",
        CKPT,
        "--out",
        str(tmp_path / "a.seg.nrrd"),
        "--state",
        str(state),
    )
    assert first.returncode == 0, first.stderr
    second = mais(
        "segment",
        "--image",
        str(case / "image.nii.gz"),
        "--resume",
        str(state),
        "--point",
        "12,0,14,+",
        "--checkpoint",
        CKPT,
        "--out",
        str(tmp_path / "b.nii.gz"),
    )
    assert second.returncode == 0, second.stderr
    assert "click 3" in second.stdout
    resumed = read_volume(tmp_path / "b.nii.gz").array
    expected = expected_mask(case, [((10, -5, 20), True), ((-30, 15, 0), False), ((12, 0, 14), True)])
    assert np.array_equal(resumed > 0, expected > 0)
    assert len(json.loads(state.read_text())["clicks"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.nii.gz", "--point", "0,0,0,+"], "no such file"),
        (["--point", "900,0,0,+"], "outside the image"),
        (["--point", "1,2,+"], "R,A,S,+"),
        ([], "no clicks"),
        (["--point", "0,0,0,+", "--checkpoint", "{bad_ckpt}"], "another architecture"),
        (["--include", "{bad_markups}"], "markups"),
    ],
)
def test_failures_are_one_line_and_leave_no_output(case, tmp_path, args, message):
    bad_ckpt = tmp_path / "other.pth"
    import torch

    torch.save(torch.nn.Linear(3, 2).state_dict(), bad_ckpt)
    bad_markups = tmp_path / "bad.mrk.json"
    bad_markups.write_text('{"points": []}')
    args = [a.format(bad_ckpt=bad_ckpt, bad_markups=bad_markups) for a in args]
    if "--image" not in args:
        args = ["--image", str(case / "image.nii.gz"), *args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", CKPT]
    out = tmp_path / "out.seg.nrrd"
    proc = mais("segment", *args, "--out", str(out), "--state", str(tmp_path / "s.json"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("mais: error:")]
    assert len(err) == 1 and message in err[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "s.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
