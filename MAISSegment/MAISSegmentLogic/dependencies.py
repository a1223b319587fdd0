"""What MAISSegment needs installed, checked at first use and installed with the user's consent (no Qt).

PyTorch comes the way the PyTorch extension installs it: ``PyTorchUtils`` installs light-the-torch (Slicer's fork,
which knows the current CUDA versions) and gives the arguments (``_getPipInstallArguments``); MAISSegment runs that
light-the-torch command in a background process of Slicer's Python (:class:`BackgroundCommands`) so that Slicer does
not freeze for the minutes the download takes. When the extension lacks those helpers, its public
``installTorch`` does the same on the main thread. The other packages are those of the module's
``Resources/requirements.txt`` (``MAISSegment/Resources/requirements.txt``), read with
``slicer.packaging.load_requirements``, checked with ``pip_check`` and installed with ``pip_ensure`` (older Slicer:
the same done here, then ``slicer.util.pip_install``). :class:`DependencyPlan` is what is missing (the confirmation
text lists it); :class:`DependenciesMixin` gives the logic ``dependency_plan`` / ``start_dependency_install``
(widget) and ``ensure_dependencies`` (synchronous; scripts). Installs happen only on Slicer's main thread.
:func:`add_library_path` makes ``MAISSegmentLib`` importable from a source checkout. Nothing here imports torch or
MAISSegmentLib at module level.
"""

import collections
import importlib.util
import inspect
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import slicer
from slicer.i18n import tr as _

from .constants import (
    MIN_TORCH_VERSION,
    MODULE_DIR,
    MODULE_NAME,
)
from .errors import MAISSegmentError


class BackgroundCommands:
    """Run commands (argv lists, no shell) one after another in a Python thread; no Qt and no MRML inside.

    For installs that take minutes (PyTorch): the main thread keeps running and polls :meth:`take_lines` (new output
    lines, stdout and stderr merged) and :attr:`finished`; :attr:`error` is ``None`` after success, else a message that
    names the failed command, its exit status and its last output lines. :meth:`cancel` stops the running process
    and skips the rest.
    """

    TAIL_LINES = 12  # output lines quoted in the error message

    def __init__(self, commands: Sequence[Sequence[str]]) -> None:
        self.commands = [list(c) for c in commands]
        self._lines: queue.Queue = queue.Queue()
        self._tail: collections.deque = collections.deque(maxlen=self.TAIL_LINES)
        self._process = None
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="MAISSegment install", daemon=True)

    def start(self) -> "BackgroundCommands":
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def take_lines(self) -> list[str]:
        """The output lines that arrived since the last call (main thread)."""
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the commands are done (scripts and tests; the widget polls instead)."""
        return self._finished.wait(timeout)

    def cancel(self, timeout: float = 5.0) -> None:
        self._cancelled.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except Exception:
                process.kill()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import subprocess

        try:
            for command in self.commands:
                if self._cancelled.is_set():
                    break
                self._lines.put("$ " + " ".join(command))
                self._process = subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    errors="replace",
                )
                for line in self._process.stdout:
                    line = line.rstrip()
                    self._lines.put(line)
                    self._tail.append(line)
                code = self._process.wait()
                if self._cancelled.is_set():
                    break
                if code != 0:
                    tail = "\n".join(self._tail)
                    self.error = f"'{' '.join(command[1:])}' failed (exit status {code}):\n{tail}"
                    break
        except OSError as exc:  # plain text here: no translation (Qt) off the main thread
            self.error = f"could not run '{' '.join(command)}': {exc}"
        finally:
            if self._cancelled.is_set() and self.error is None:
                self.error = "cancelled"
            self._finished.set()


TORCH_INSTALL_EXTRA = ("torchvision",)  # what PyTorchUtils installs beside torch (used only without its helper)


@dataclass
class DependencyPlan:
    """What :meth:`MAISSegmentLogic.dependency_plan` found missing, and how it will be installed.

    ``torch_commands``: the commands that install PyTorch (empty when it is installed): Slicer's Python running
    light-the-torch with the PyTorch extension's arguments, in a background process. ``packages``: the lines of the
    module's ``Resources/requirements.txt`` that are not satisfied (installed afterwards with ``pip_ensure``).
    """

    torch_commands: list[list[str]] = field(default_factory=list)
    torch_requirement: str = ""
    packages: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(self.torch_commands or self.packages)

    def describe(self) -> str:
        """The confirmation text: every package that will be downloaded and installed."""
        lines = [_("MAISSegment needs these Python packages, which will be downloaded and installed now:"), ""]
        if self.torch_commands:
            lines.append(
                "• "
                + _(
                    "PyTorch ({requirement}): the CUDA or CPU build that fits this computer, chosen by the PyTorch "
                    "extension (light-the-torch; 1-3 GB; several minutes; Slicer stays usable meanwhile)"
                ).format(requirement=self.torch_requirement)
            )
        lines += [f"• {p}" for p in self.packages]
        return "\n".join(lines)


def _pytorch_utils() -> Any:
    """The PyTorch extension's ``PyTorchUtils`` module (imported at first use).

    Raises:
        MAISSegmentError: the extension is not installed (the message says how to get it).
    """
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise MAISSegmentError(
            _(
                "MAISSegment needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and "
                "restart Slicer."
            )
        ) from None
    return PyTorchUtils


def torch_requirement() -> str:
    """The version requirement MAISSegment passes to the PyTorch extension (``>=2.5``)."""
    return f">={MIN_TORCH_VERSION}"


def pytorch_utils_install_arguments(logic_class: Any) -> list[str] | None:
    """The light-the-torch arguments the PyTorch extension would use (``install torch>=2.5 torchvision ...``, with its
    platform pins), from its ``PyTorchUtilsLogic._getPipInstallArguments``; None when this version of the extension
    has no such helper or it fails (then :meth:`DependenciesMixin.start_dependency_install` uses ``installTorch``)."""
    build = getattr(logic_class, "_getPipInstallArguments", None)
    if build is None:
        return None
    try:
        arguments = list(build(torchVersionRequirement=torch_requirement()))
    except Exception:  # another version of the extension: its public installTorch is used instead
        logging.exception("MAISSegment: PyTorchUtils._getPipInstallArguments failed")
        return None
    return arguments or None


def slicer_python() -> str:
    """The Python interpreter that installs into this Slicer (``PythonSlicer``), else this process's Python."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def _slicer_packaging() -> Any:
    """``slicer.packaging`` (Slicer 5.10+: ``load_requirements``, ``pip_check``, ``pip_ensure``), or None."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is None:
        try:
            import slicer.packaging as packaging
        except ImportError:
            return None
    return packaging


def read_requirements(path: str) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options skipped), through
    ``slicer.packaging.load_requirements`` when Slicer has it."""
    packaging = _slicer_packaging()
    load = getattr(packaging, "load_requirements", None)
    if load is not None:
        return [str(requirement) for requirement in load(path)]
    lines = []
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "-")):
                lines.append(line)
    return lines


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements (PEP 508 strings) that are not installed at an acceptable version in this Python
    (``slicer.packaging.pip_check`` when Slicer has it: it also follows extras)."""
    check = getattr(_slicer_packaging(), "pip_check", None)
    if check is not None:
        return [text for text in requirements if not check(text)]
    from importlib import metadata

    try:
        from packaging.requirements import Requirement  # shipped with Slicer
    except ImportError:  # pragma: no cover - packaging is everywhere pip is
        Requirement = None
    missing = []
    for text in requirements:
        if Requirement is None:
            name, specifier, marker = re.split(r"[<>=!~;\[ ]", text, maxsplit=1)[0], None, None
        else:
            req = Requirement(text)
            name, specifier, marker = req.name, req.specifier, req.marker
        if marker is not None and not marker.evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if specifier is not None and not specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def add_library_path() -> None:
    """Make ``MAISSegmentLib`` importable when the module runs from a source checkout (it lies beside MAISSegment/);
    an installed extension has it beside this file, on Slicer's module path already."""
    for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(folder, "MAISSegmentLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


def _on_main_thread_in_slicer() -> bool:
    """Inside the Slicer application and on its main thread: the only place where anything is installed (installing
    asks first, in dialogs; Qt widgets outside the main thread crash Slicer)."""
    return getattr(slicer, "app", None) is not None and threading.current_thread() is threading.main_thread()


class DependenciesMixin:
    """The logic's dependency checks and installs (see the module docstring)."""

    @property
    def requirements_file(self) -> str | None:
        """The requirements file checked by :meth:`ensure_dependencies` (None: the module's
        ``Resources/requirements.txt``); setting it makes the next call check again."""
        return self._requirements_file

    @requirements_file.setter
    def requirements_file(self, path: str | None) -> None:
        self._requirements_file = path
        self._dependencies_ok = False

    def requirements_path(self) -> str | None:
        """The module's ``Resources/requirements.txt`` (beside ``MAISSegment.py``, in a checkout as once installed)."""
        if self.requirements_file:
            return self.requirements_file
        path = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
        return path if os.path.isfile(path) else None

    def missing_requirements(self) -> list[str]:
        """The packages of the requirements file that this Python lacks (torch is handled separately)."""
        path = self.requirements_path()
        return missing_requirements(read_requirements(path)) if path else []

    def dependencies_present(self) -> bool:
        """Cheap check (nothing imported): whether torch is installed and MAISSegmentLib can be found."""
        add_library_path()
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("MAISSegmentLib") is not None

    def ensure_dependencies(self, confirm: Callable[[list[str]], bool] | None = None) -> None:
        """Make torch and the packages of the requirements file available; nothing is imported before.

        Inside Slicer, on the main thread (it may show dialogs), torch comes from the PyTorch extension
        (``PyTorchUtilsLogic.installTorch`` chooses the CUDA or CPU build for the machine, asking first) and missing
        packages are listed to the user (``confirm(packages) -> bool``; default: a dialog) before
        ``slicer.packaging.pip_ensure`` (``slicer.util.pip_install`` in older Slicer) installs them. Outside Slicer,
        and on any other thread, nothing is installed: a missing package is an error naming it.

        Raises:
            MAISSegmentError: a dependency is missing and was not installed (the message says what to do).
        """
        if self._dependencies_ok:
            return
        # Only the main thread may install: on the worker thread a missing dependency is an error naming it.
        in_slicer = _on_main_thread_in_slicer()
        self._ensure_torch(in_slicer)
        missing = self.missing_requirements()
        if missing:
            packages = ", ".join(missing)
            if not in_slicer:
                raise MAISSegmentError(
                    _("Missing Python packages: {packages}. Install them into this Python environment.").format(
                        packages=packages
                    )
                )
            if not (confirm or self._confirm_install)(missing):
                raise MAISSegmentError(
                    _("MAISSegment cannot run without these Python packages: {packages}.").format(packages=packages)
                )
            self._pip_install(missing)
            still = self.missing_requirements()
            if still:
                raise MAISSegmentError(
                    _("Installing {packages} did not succeed; see the Python console.").format(
                        packages=", ".join(still)
                    )
                )
        add_library_path()
        if importlib.util.find_spec("MAISSegmentLib") is None:
            raise MAISSegmentError(_("MAISSegmentLib is missing from this installation; reinstall the extension."))
        self._dependencies_ok = True

    @staticmethod
    def _confirm_install(packages: list[str]) -> bool:
        text = DependencyPlan(packages=list(packages)).describe()
        return bool(slicer.util.confirmOkCancelDisplay(text, _("MAISSegment: install Python packages")))

    @staticmethod
    def _pip_install(packages: list[str]) -> None:
        """Install through ``slicer.packaging.pip_ensure`` (the user was asked already), else ``slicer.util``."""
        ensure = getattr(_slicer_packaging(), "pip_ensure", None)
        if ensure is not None:
            wanted = {"prompt_install": False, "requester": MODULE_NAME}
            try:
                accepted = inspect.signature(ensure).parameters
            except (TypeError, ValueError):
                accepted = {}
            ensure(list(packages), **{k: v for k, v in wanted.items() if k in accepted})
        else:
            slicer.util.pip_install(list(packages))

    @staticmethod
    def _ensure_torch(in_slicer: bool) -> None:
        if in_slicer:
            torch_logic = _pytorch_utils().PyTorchUtilsLogic()
            if not torch_logic.torchInstalled():
                logging.info("MAISSegment: PyTorch is required; installing it (this may take several minutes)")
                if torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=torch_requirement()) is None:
                    raise MAISSegmentError(_("PyTorch was not installed; MAISSegment cannot run without it."))
            version = torch_logic.torch.__version__
        else:
            if importlib.util.find_spec("torch") is None:
                raise MAISSegmentError(_("PyTorch is not installed in this Python environment (pip install torch)."))
            import torch

            version = torch.__version__
        if _version_tuple(version) < _version_tuple(MIN_TORCH_VERSION):
            raise MAISSegmentError(
                _(
                    "PyTorch {version} is too old; MAISSegment needs {minimum} or newer (PyTorch Utils module: "
                    "install with the version requirement >={minimum})."
                ).format(version=version, minimum=MIN_TORCH_VERSION)
            )

    def dependency_plan(self) -> DependencyPlan:
        """What is missing and how it will be installed; cheap (nothing heavy is imported), main thread. Empty once
        :meth:`ensure_dependencies` has succeeded.

        Raises:
            MAISSegmentError: inside Slicer without the PyTorch extension (it says to install it).
        """
        if self._dependencies_ok:  # checked once by ensure_dependencies: every later point skips the lookups
            return DependencyPlan()
        plan = DependencyPlan(packages=self.missing_requirements())
        if importlib.util.find_spec("torch") is None:
            plan.torch_requirement = "torch" + torch_requirement()
            if getattr(slicer, "app", None) is not None:
                plan.torch_commands = self.torch_install_commands()
        return plan

    @staticmethod
    def torch_install_commands() -> list[list[str]]:
        """The command that installs PyTorch the way the PyTorch extension does, for a background process.

        ``PyTorchUtilsLogic.installTorch`` runs light-the-torch on the main thread, which freezes Slicer for minutes
        with no output. The same installation is run here by Slicer's Python (``PythonSlicer -m light_the_torch``)
        with the arguments PyTorchUtils builds (``_getPipInstallArguments``: torch, torchvision and its platform
        pins); light-the-torch itself (Slicer's fork) is installed by PyTorchUtils first, in
        :meth:`start_dependency_install`. Without that helper the command shows the plain arguments, and
        :meth:`start_dependency_install` lets ``installTorch`` do the work.
        """
        arguments = pytorch_utils_install_arguments(_pytorch_utils().PyTorchUtilsLogic)
        if arguments is None:
            arguments = ["install", "torch" + torch_requirement(), *TORCH_INSTALL_EXTRA]
        return [[slicer_python(), "-m", "light_the_torch", *arguments]]

    def start_dependency_install(self, plan: DependencyPlan) -> BackgroundCommands:
        """Start installing PyTorch in the background (the user has confirmed ``plan.describe()``); main thread.

        light-the-torch (Slicer's fork) is installed first, by the PyTorch extension
        (``PyTorchUtilsLogic._installLightTheTorch``, a small package, on the main thread as the extension does),
        unless it is there already; then ``plan.torch_commands`` run in a background process. When this version of the
        extension lacks those helpers, its public ``installTorch`` installs PyTorch right away (Slicer waits) and the
        returned run has already finished (``error`` says whether it worked).

        When the run has finished without error, call :meth:`ensure_dependencies` with
        ``confirm=lambda packages: True`` on the main thread: it finds torch and installs ``plan.packages`` with
        ``pip_ensure``.

        Raises:
            MAISSegmentError: not on Slicer's main thread, or the PyTorch extension is missing.
        """
        if not _on_main_thread_in_slicer():
            raise MAISSegmentError(_("PyTorch can only be installed from Slicer's main thread."))
        logic_class = _pytorch_utils().PyTorchUtilsLogic
        install_ltt = getattr(logic_class, "_installLightTheTorch", None)
        if pytorch_utils_install_arguments(logic_class) is None or install_ltt is None:
            return self._install_torch_now(logic_class)
        if importlib.util.find_spec("light_the_torch") is None:
            logging.info("MAISSegment: installing light-the-torch through the PyTorch extension")
            install_ltt()
            importlib.invalidate_caches()
        return BackgroundCommands(plan.torch_commands).start()

    @staticmethod
    def _install_torch_now(logic_class: Any) -> BackgroundCommands:
        """The PyTorch extension's public ``installTorch`` (blocking), wrapped as an already finished run."""
        run = BackgroundCommands([])
        try:
            torch = logic_class().installTorch(askConfirmation=False, torchVersionRequirement=torch_requirement())
        except Exception as exc:  # plain text: the widget shows it with its own translated sentence
            torch, run.error = None, f"PyTorchUtils.installTorch failed: {exc}"
        run.start().wait()
        if torch is None and run.error is None:
            run.error = "PyTorchUtils.installTorch did not install PyTorch"
        return run
