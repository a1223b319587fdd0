"""Learn from my cases: fine-tune the current model on finished cases in a background process.

What happens (``LearnRun.run()`` or, non-blocking, ``start()`` + ``poll()`` + ``finish()``):

1. The cases (a ``data.load_cases`` manifest or folder, e.g. written by ``mrml_export.export_cases``) are split:
   the cases whose split is ``"test"`` (else the last ``holdout`` cases) are held aside, the others train.
2. A separate Python process (``python -m MAISSegmentLib.learn_worker CONFIG``) fine-tunes the base checkpoint with
   the MAIS recipe (:func:`MAISSegmentLib.train.train`, mode ``"finetune"``: encoder frozen), then runs the robot user
   of ``docs/EVALUATION.md`` (:func:`MAISSegmentLib.evaluate.evaluate`) on the held-aside cases with the base model
   ("before") and the fine-tuned one ("after"). It reports progress as JSON lines on its standard output (one object
   per line, key ``"event"``) and writes ``result.json`` and ``run/model.pth`` into the run's work folder.
3. Only when the process succeeded does the caller's process register the new checkpoint in the user registry
   (:func:`MAISSegmentLib.weights.import_weights`) under a new id (``<base>-ft<N>``), so the user can switch to it
   and back. The work folder (exported cases, preprocessing cache, run files) is deleted in every outcome.

A separate process (not a thread): training saturates the CPU/GPU for minutes, may run out of memory, and must be
cancellable at any moment without leaving the host application (3D Slicer) in a broken state. :meth:`LearnRun.cancel`
terminates it; the current model and the registry are untouched then, and the temporary files are removed.

The process is started with ``sys.executable`` (inside Slicer: ``PythonSlicer``) and ``MAISSegmentLib`` on its
``PYTHONPATH``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, MAISError

WORKER_MODULE = "MAISSegmentLib.learn_worker"
CONFIG_FILE = "learn_config.json"
RESULT_FILE = "result.json"
STDERR_FILE = "stderr.log"
RUN_FOLDER = "run"  # the train() run folder inside the work folder (model.pth, last.pth, log.csv)
CASES_FOLDER = "cases"  # where callers may export cases into the work folder (deleted with it)
STDERR_TAIL_LINES = 25  # lines of the worker's error output quoted in a failure message
LIB_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the MAISSegmentLib package
_FT_SUFFIX = re.compile(r"-ft(\d+)$")

EventCallback = Callable[[dict[str, Any]], None]


class LearnError(MAISError, RuntimeError):
    """A fine-tuning run that could not be started, failed or could not be registered (the message says why)."""


class LearnCancelled(LearnError):
    """The run was cancelled; nothing was registered."""


@dataclass
class LearnConfig:
    """One fine-tuning run (written as JSON for the worker process).

    Args:
        base_checkpoint: the weight file to start from (the model in use).
        data: a ``data.load_cases`` manifest JSON or folder of image/label pairs.
        base_model_id: the base model's id (names the new one: ``<base>-ft<N>``); "" = from the file name.
        steps: optimizer steps (each ``batch_size`` click episodes of ``episode_clicks`` clicks on a 128³ crop).
        holdout: cases held aside for the before/after comparison when no case has split ``"test"``; 0: none.
        clicks: click counts at which the before/after Dice is recorded.
        batch_size, episode_clicks, tbptt, memory_size, loss_size: the training recipe (``TrainConfig``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        seed: random seed (crops, clicks).
        structures: train only on labels whose name contains one of these (case-insensitive); empty: all labels.
        model_id, version: of the new model; "" = the next free ``<base>-ft<N>`` and ``ft<N>-<date>``.
        nice: niceness added to the worker process (POSIX), so interactive work stays responsive.
        threads: torch CPU threads in the worker (0: torch's default).
    """

    base_checkpoint: str
    data: str = ""
    base_model_id: str = ""
    steps: int = 100
    holdout: int = 1
    clicks: tuple[int, ...] = (1, 3, 5)
    batch_size: int = 1
    episode_clicks: int = 8
    tbptt: int = 4
    memory_size: int = 60
    loss_size: int = 32
    device: str = "cpu"
    seed: int = 0
    structures: tuple[str, ...] = ()
    model_id: str = ""
    version: str = ""
    nice: int = 5
    threads: int = 0

    def __post_init__(self) -> None:
        self.clicks = tuple(int(c) for c in self.clicks)
        self.structures = tuple(str(s) for s in self.structures)

    def check(self) -> None:
        """Raise :class:`ConfigError` for values the run cannot use (before anything is started)."""
        from .weights import _ID

        if not self.base_checkpoint or not Path(self.base_checkpoint).is_file():
            raise ConfigError(f"the model to fine-tune, {self.base_checkpoint!r}, is not a file; select a model first")
        if self.steps < 1 or self.batch_size < 1 or self.episode_clicks < 1 or self.tbptt < 1:
            raise ConfigError("steps, batch size, clicks per episode and tbptt must be at least 1")
        if self.holdout < 0:
            raise ConfigError(f"the number of cases held aside must be 0 or more, got {self.holdout}")
        if not self.clicks or min(self.clicks) < 1:
            raise ConfigError("the before/after comparison needs click counts of at least 1, e.g. 1,3,5")
        if self.model_id and not _ID.match(self.model_id):
            raise ConfigError(f"invalid model id {self.model_id!r}: use letters, digits, '.', '_' and '-' (at most 64)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LearnConfig:
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"unknown learn option(s): {', '.join(unknown)}")
        return cls(**raw)


@dataclass
class LearnResult:
    """A finished and registered run.

    model_id, version: the new model (select it with ``model_id``). checkpoint: its file in the weight cache.
    base_model_id: what it was fine-tuned from. clicks: the click counts of ``before``/``after``, which map
    ``str(click count)`` to the mean Dice over the held-aside targets (None when no case was held aside).
    train_cases, eval_cases: case ids. steps: optimizer steps done. seconds: wall time of the worker process.
    document: the evaluation result (``docs/EVALUATION.md`` schema, methods ``before``/``after``) or None.
    """

    model_id: str
    version: str
    checkpoint: Path
    base_model_id: str
    clicks: list[int]
    before: dict[str, float] | None
    after: dict[str, float] | None
    train_cases: list[str]
    eval_cases: list[str]
    steps: int
    seconds: float
    document: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> list[tuple[int, float | None, float | None]]:
        """``(clicks, Dice before, Dice after)`` rows (None when there was no held-aside case)."""
        return [
            (c, (self.before or {}).get(str(c)), (self.after or {}).get(str(c)))
            for c in self.clicks
            if self.before is not None
        ]


# ------------------------------------------------------------------------------------------------ helpers
def split_cases(cases: Sequence[Any], holdout: int) -> tuple[list[Any], list[Any]]:
    """``(train, held aside)``: cases with split ``"test"`` are held aside; if there are none, the last ``holdout``.

    Raises:
        ConfigError: nothing would be left to train on.
    """
    tests = [c for c in cases if getattr(c, "split", "") == "test"]
    held = tests or (list(cases[max(0, len(cases) - holdout) :]) if holdout > 0 else [])
    train = [c for c in cases if c not in held]
    if not train:
        raise ConfigError(
            f"{len(cases)} case(s) and {len(held)} held aside for the before/after comparison leave nothing to "
            "learn from: add cases, or hold fewer aside (0 skips the comparison)"
        )
    return train, held


def family_id(model_id: str, checkpoint: str | os.PathLike) -> str:
    """The id new versions are named after: ``model_id`` (or the file name) without a ``-ft<N>`` suffix."""
    base = model_id or Path(checkpoint).name.split(".")[0]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "model"
    return _FT_SUFFIX.sub("", base)[:56]


def next_model_version(
    model_id: str,
    checkpoint: str | os.PathLike,
    registry: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> tuple[str, str]:
    """``(id, version)`` of the next fine-tuned version: ``<family>-ft<N>`` with N one more than any registered
    (or imported) one of the family, and version ``ft<N>-<YYYYMMDD>``."""
    from .weights import list_models

    family = family_id(model_id, checkpoint)
    numbers = [
        int(m.group(1))
        for e in list_models(registry, cache)
        if e.id.startswith(family + "-ft") and (m := _FT_SUFFIX.search(e.id)) and e.id[: m.start()] == family
    ]
    n = max(numbers, default=0) + 1
    return f"{family}-ft{n}", f"ft{n}-{datetime.date.today():%Y%m%d}"


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(collections.deque(fh, maxlen=lines)).strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ the run
class LearnRun:
    """One fine-tuning run in a background process, with progress, cancel and registration of the result.

    Args:
        config: the run (``config.data`` may be filled in after construction, e.g. after exporting cases into
            :attr:`cases_dir`, and before :meth:`start`).
        on_event: called with every progress event (a dict with ``"event"``) from :meth:`poll`, on the caller's
            thread.
        registry, cache: the model registry and weight cache (defaults of :mod:`MAISSegmentLib.weights`).
        python: the Python executable for the worker (default ``sys.executable``; inside Slicer ``PythonSlicer``).
        work_root: where the temporary work folder is created (default: the system's temporary folder).

    Attributes:
        state: ``"ready"``, ``"running"``, ``"succeeded"`` (process done, not yet registered), ``"failed"``,
            ``"cancelled"`` or ``"registered"``.
        progress: 0..1 overall. message: the last progress text. events: every event received.
    """

    def __init__(
        self,
        config: LearnConfig,
        on_event: EventCallback | None = None,
        registry: str | os.PathLike | None = None,
        cache: str | os.PathLike | None = None,
        python: str | None = None,
        work_root: str | os.PathLike | None = None,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.registry, self.cache = registry, cache
        self.python = python or sys.executable
        self.work_dir = Path(tempfile.mkdtemp(prefix="maissegment-learn-", dir=work_root))
        self.state = "ready"
        self.progress = 0.0
        self.message = ""
        self.events: list[dict[str, Any]] = []
        self.error: str | None = None
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._stderr = None
        self._started_at = 0.0
        self._seconds = 0.0

    @property
    def cases_dir(self) -> Path:
        """A folder inside the work folder for exported cases (deleted with it)."""
        return self.work_dir / CASES_FOLDER

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -------------------------------------------------------------------------------------------- start
    def start(self) -> None:
        """Check the configuration, choose the new model's id and start the worker process (returns at once).

        Raises:
            ConfigError: invalid settings (nothing started). LearnError: the process cannot be started.
        """
        if self.state != "ready":
            raise LearnError(f"this run was already started (state {self.state!r}); start a new one")
        cfg = self.config
        try:
            cfg.check()
            if not cfg.data:
                raise ConfigError("no cases to learn from: export cases or choose a manifest/folder first")
            if not cfg.model_id:
                cfg.model_id, version = next_model_version(
                    cfg.base_model_id, cfg.base_checkpoint, self.registry, self.cache
                )
                cfg.version = cfg.version or version
            cfg.version = cfg.version or "1"
            # the worker runs in the work folder: give it absolute paths
            cfg.base_checkpoint, cfg.data = os.path.abspath(cfg.base_checkpoint), os.path.abspath(cfg.data)
            (self.work_dir / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIB_ROOT), env.get("PYTHONPATH", "")) if p)
            env["PYTHONUNBUFFERED"] = "1"
            self._stderr = open(self.work_dir / STDERR_FILE, "wb")  # noqa: SIM115 - closed in _finished()
            self._proc = subprocess.Popen(
                [self.python, "-m", WORKER_MODULE, str(self.work_dir / CONFIG_FILE)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                cwd=self.work_dir,
                env=env,
            )
        except ConfigError:
            self.cleanup()
            raise
        except OSError as exc:
            self.cleanup()
            raise LearnError(f"cannot start the fine-tuning process with {self.python}: {exc}") from None
        self._started_at = time.monotonic()
        self.state = "running"
        self.message = "starting"
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            self._lines.put(raw.decode("utf-8", errors="replace"))
        self._lines.put(None)  # end of output

    # -------------------------------------------------------------------------------------------- progress
    def poll(self) -> list[dict[str, Any]]:
        """Take the events the worker sent since the last call (calls ``on_event`` for each) and notice when it
        ended. Call it regularly (e.g. from a timer); it never blocks."""
        new: list[dict[str, Any]] = []
        ended = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not an event (a library printing on stdout)
            if isinstance(event, dict) and "event" in event:
                new.append(event)
        for event in new:
            self._apply(event)
        if self.state == "running" and (ended or self._proc.poll() is not None) and self._output_done(ended):
            self._finished()
        return new

    def _output_done(self, ended: bool) -> bool:
        """Whether every line of the (exited) process has been read."""
        return ended or (self._reader is not None and not self._reader.is_alive() and self._lines.empty())

    def _apply(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if "fraction" in event:
            self.progress = max(self.progress, min(1.0, float(event["fraction"])))
        if event.get("message"):
            self.message = str(event["message"])
        if event.get("event") == "error":
            self.error = str(event.get("message") or "")
        if self.on_event is not None:
            self.on_event(event)

    def _finished(self) -> None:
        self.returncode = self._proc.wait()
        self._seconds = time.monotonic() - self._started_at
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.returncode == 0 and (self.work_dir / RESULT_FILE).is_file():
            self.state = "succeeded"
            self.progress = 1.0
        else:
            self.state = "failed"

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Poll until the process ends (or ``timeout`` seconds pass). Returns :attr:`state`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "running" and (deadline is None or time.monotonic() < deadline):
            self.poll()
            if self.state == "running":
                time.sleep(interval)
        return self.state

    # -------------------------------------------------------------------------------------------- end
    def cancel(self, timeout: float = 10.0) -> None:
        """Stop the process (terminate, then kill after ``timeout`` s) and delete the work folder. Nothing is
        registered and the current model is untouched. Harmless when the run is not running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self.state in ("ready", "running", "succeeded"):
            self.state = "cancelled"
            self.message = "cancelled"
        self.cleanup()

    def failure_message(self) -> str:
        """Why the run failed: the worker's error, its exit status and the end of its error output."""
        parts = [f"fine-tuning failed: {self.error}" if self.error else "fine-tuning failed"]
        if self.returncode not in (None, 0):
            parts.append(f"(the process exited with status {self.returncode})")
        tail = _tail(self.work_dir / STDERR_FILE)
        if tail:
            parts.append("\nlast lines of its output:\n" + tail)
        return " ".join(parts[:2]) + "".join(parts[2:])

    def finish(self) -> LearnResult:
        """After the process ended: register the new model and return the result; the work folder is deleted.

        Raises:
            LearnCancelled: the run was cancelled. LearnError: it failed (with its error output), or the model
                could not be registered (the registry is then as before).
        """
        if self.state == "running":
            self.wait()
        try:
            if self.state == "cancelled":
                raise LearnCancelled("fine-tuning was cancelled; the model in use and the model list are unchanged")
            if self.state == "registered":
                raise LearnError("this run's model was registered already")
            if self.state != "succeeded":
                raise LearnError(self.failure_message())
            return self._register()
        finally:
            self.cleanup()

    def _register(self) -> LearnResult:
        from .weights import WeightsError, import_weights

        cfg = self.config
        try:
            result = json.loads((self.work_dir / RESULT_FILE).read_text(encoding="utf-8"))
            checkpoint = self.work_dir / result["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.state = "failed"
            raise LearnError(f"the fine-tuning process left no usable result ({exc})") from None
        try:
            entry = import_weights(checkpoint, id=cfg.model_id, registry=self.registry, cache=self.cache)
        except (MAISError, OSError) as exc:
            self.state = "failed"
            kind = "cannot be registered" if isinstance(exc, WeightsError) else "is not usable"
            raise LearnError(f"the fine-tuned model {kind}: {exc}") from None
        self.state = "registered"
        doc = result.get("evaluation")
        methods = (doc or {}).get("methods", {})
        return LearnResult(
            model_id=entry.id,
            version=entry.version or cfg.version,
            checkpoint=Path(entry.path),
            base_model_id=cfg.base_model_id,
            clicks=list(cfg.clicks),
            before=methods.get("before", {}).get("dice_mean") if doc else None,
            after=methods.get("after", {}).get("dice_mean") if doc else None,
            train_cases=list(result.get("train_cases", [])),
            eval_cases=list(result.get("eval_cases", [])),
            steps=int(result.get("steps", cfg.steps)),
            seconds=self._seconds,
            document=doc,
            notes=list(result.get("notes", [])),
        )

    def run(self) -> LearnResult:
        """:meth:`start`, wait, :meth:`finish` (blocking)."""
        self.start()
        self.wait()
        return self.finish()

    def cleanup(self) -> None:
        """Delete the work folder (exported cases, preprocessing cache, checkpoints of the run)."""
        if self._stderr is not None:
            with contextlib.suppress(OSError):
                self._stderr.close()
            self._stderr = None
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LearnRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.cancel()
        self.cleanup()


__all__ = [
    "LearnCancelled",
    "LearnConfig",
    "LearnError",
    "LearnResult",
    "LearnRun",
    "family_id",
    "next_model_version",
    "split_cases",
]
