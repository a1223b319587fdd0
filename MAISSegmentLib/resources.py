"""Where the extension-level resources are: the model registry, the bundled models and the sample case.

They live in the repository's ``Resources/`` folder. Three layouts reach them:

* a checkout, an editable install or the Slicer extension (``MAISSegmentLib/`` is installed beside
  ``Resources/``): ``<folder holding MAISSegmentLib>/Resources``;
* a wheel (``pip install MAISSegment``): ``pyproject.toml`` ships ``Resources/`` inside the package as
  ``MAISSegmentLib/_resources`` (the package data of the ``MAISSegmentLib._resources`` mapping).

The copy inside the package wins when it is there, so an installed wheel never reads a stray
``Resources/`` folder that happens to lie beside site-packages.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_RESOURCES = Path(__file__).resolve().parent / "_resources"  # inside an installed wheel
CHECKOUT_RESOURCES = Path(__file__).resolve().parents[1] / "Resources"  # checkout, editable install, Slicer
MARKER = "models.json"  # a resources folder has at least the model registry


def resources_dir() -> Path:
    """The resources folder in use: the package's copy (wheel install), else the checkout's ``Resources/``.

    When neither holds ``models.json`` the checkout's path is returned, so that error messages name the
    place where the files were expected.
    """
    for candidate in (PACKAGE_RESOURCES, CHECKOUT_RESOURCES):
        if (candidate / MARKER).is_file():
            return candidate
    return CHECKOUT_RESOURCES


def sample_dir() -> Path:
    """The bundled sample case of ``mais demo`` (``<resources>/sample``: images, labels, manifest.json)."""
    return resources_dir() / "sample"
