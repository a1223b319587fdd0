"""The module's worker thread (issue 11, item 8): it survives any exception, never reaches a dialog, and saving the
scene does not serialise a session in the middle of a click."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest
from slicer_headless import mrml_fixture  # noqa: F401  (provides the "mrml" fixture)
from slicer_module_stubs import module_fixture  # noqa: F401  (provides the "module" fixture)

from test_slicer_module import scene_fixture, started_fixture  # noqa: F401  (the module tests' fixtures)


def deliver_all(worker, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while worker.pending and time.time() < deadline:
        worker.deliver()
        time.sleep(0.01)


def test_the_worker_survives_any_exception_and_delivers_it(module):
    """A job raising KeyboardInterrupt or SystemExit (not Exception subclasses) is delivered as its error, the UI is
    told (no 'busy forever'), and the thread goes on with the next job."""
    worker = module.Worker()
    try:
        delivered = []

        def interrupted():
            raise KeyboardInterrupt

        def exiting():
            raise SystemExit(3)

        worker.submit(interrupted, lambda r, e: delivered.append(type(e)))
        worker.submit(exiting, lambda r, e: delivered.append(type(e)))
        worker.submit(lambda: "next", lambda r, e: delivered.append(r))
        deliver_all(worker)
        assert delivered == [KeyboardInterrupt, SystemExit, "next"]
        assert worker.pending == 0
    finally:
        worker.stop()


def test_dependencies_are_never_installed_from_the_worker_thread(module, monkeypatch, tmp_path):
    """Inside Slicer (simulated): on the main thread a missing package is offered for installation (a dialog); on
    the worker thread the same call is an error naming it, with no dialog and no install."""
    import slicer

    logic = module.MAISSegmentLogic()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("maissegment-no-such-package>=1.0\n")
    logic.requirements_file = str(requirements)
    calls = []
    torch_logic = types.SimpleNamespace(
        torchInstalled=lambda: True,
        installTorch=lambda **kw: calls.append("installTorch"),
        torch=types.SimpleNamespace(__version__="2.6.0"),
    )
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: torch_logic))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(), raising=False)
    confirm = lambda packages: calls.append(("asked", packages)) and False  # noqa: E731
    errors = []

    def on_worker():
        try:
            logic.ensure_dependencies(confirm=confirm)
        except module.MAISSegmentError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=on_worker)
    thread.start()
    thread.join(30)
    assert calls == [] and errors and "maissegment-no-such-package" in errors[0]
    with pytest.raises(module.MAISSegmentError, match="cannot run without"):
        logic.ensure_dependencies(confirm=confirm)  # the main thread asks
    assert calls == [("asked", ["maissegment-no-such-package>=1.0"])]


def test_saving_the_scene_does_not_serialise_a_session_mid_click(started):
    """Between prepare_update and apply_update the worker owns the session: a scene save meanwhile keeps the state
    stored after the last finished change instead of reading the session."""
    from MAISSegmentLib.mrml_state import load_state

    s = started
    stored = load_state(s.seg, s.ids["target"])
    s.T.place(s.include, s.T.ras((31, 25, 20)))
    request = s.logic.prepare_update(*s.target, s.include, s.exclude)
    session = s.logic.session(*s.target)
    session.state = lambda: pytest.fail("the session was serialised while the worker owned it")
    assert s.logic.save_state_to_scene() == 0
    assert load_state(s.seg, s.ids["target"]) == stored
    del session.state
    s.logic.apply_update(s.logic.compute_update(request))
    assert s.logic.save_state_to_scene() == 1
    assert len(load_state(s.seg, s.ids["target"])["clicks"]) == 2
