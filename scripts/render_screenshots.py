#!/usr/bin/env python3
"""Regenerate the pictures of docs/screenshots/ (README and EXTENSION_SCREENSHOTURLS of CMakeLists.txt).

    .venv/bin/python scripts/render_screenshots.py                 # all three, with a fresh `mais demo`
    .venv/bin/python scripts/render_screenshots.py --only panel    # e.g. after the panel's .ui changed
    .venv/bin/python scripts/render_screenshots.py --demo-dir out/demo   # reuse a `mais demo --out out/demo`

* ``panel.png``: the panel rendered headless (Qt ``offscreen``) from the module's ``Resources/UI/MAISSegment.ui``
  with PySide6's ``QUiLoader``. Slicer is not running, so its own widgets are stand-ins: each Slicer/CTK class of the
  ``.ui`` (collapsible sections, node selectors, the Segment Editor, path editors...) is drawn as the nearest Qt
  widget with the same labels (a collapsible section as a titled group, a node selector as a combo box showing a
  typical node, the Segment Editor as a framed placeholder naming it). Texts the widget sets at run time are taken
  from ``MAISSegment.py`` (its literal ``self.ui.<name>.text = _("...")`` assignments, first one in the file) and
  ``docs/screenshots/panel_texts.json`` (texts computed at run time, e.g. the first-use hint, as a fresh CT shows
  them).
* ``result_slices.png``: axial, coronal and sagittal slices of the bundled sample CT (``Resources/sample/``) through
  the mask of ``mais demo`` (the built-in model, simulated clicks), with the mask's outline and the reference label's.
* ``result_3d.png``: the demo mask's surface (``skimage.measure.marching_cubes``) drawn with matplotlib.

``mais demo`` runs with this checkout's ``.venv``. The drawing needs PySide6 and scikit-image, which the project does
not otherwise use: they are installed on demand into a separate environment (``$MAIS_SCREENSHOTS_VENV``, default
``~/.cache/maissegment/screenshots-venv``), never into ``.venv`` nor by ``scripts/setup_env.sh``. Every PNG is kept
under 300 KB.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "MAISSegment" / "Resources" / "UI" / "MAISSegment.ui"
MODULE_FILE = ROOT / "MAISSegment" / "MAISSegment.py"
SAMPLE = ROOT / "Resources" / "sample"
OUT = ROOT / "docs" / "screenshots"
TEXTS_FILE = OUT / "panel_texts.json"
VENV = Path(os.environ.get("MAIS_SCREENSHOTS_VENV", Path.home() / ".cache" / "maissegment" / "screenshots-venv"))
RENDER_PACKAGES = ["PySide6-Essentials", "scikit-image", "matplotlib", "SimpleITK", "numpy"]
MAX_BYTES = 300_000
PANEL_WIDTH = 420  # about Slicer's default module panel width

# Slicer / CTK classes -> (Qt class drawn instead, how). Any other non-Qt class falls back to what it extends.
STAND_INS = {
    "ctkCollapsibleButton": "QGroupBox",
    "ctkCollapsibleGroupBox": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLSegmentSelectorWidget": "QComboBox",
    "qMRMLSubjectHierarchyComboBox": "QComboBox",
    "ctkComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSliderWidget": "QDoubleSpinBox",
    "ctkDoubleSpinBox": "QDoubleSpinBox",
    "ctkMenuButton": "QPushButton",
    "ctkCheckBox": "QCheckBox",
    "qMRMLSegmentEditorWidget": "QLabel",
    "qMRMLSegmentsTableView": "QLabel",
    "qMRMLWidget": "QWidget",
    "qSlicerWidget": "QWidget",
}
PLACEHOLDERS = {  # stand-ins that only name the Slicer widget they replace
    "qMRMLSegmentEditorWidget": "Slicer's Segment Editor\n(segment list: add, name, colour; Paint, Erase, masking)",
    "qMRMLSegmentsTableView": "Slicer's segment list",
}
NODE_COMBO_TEXT = {  # what a node selector shows on a fresh CT (by its object name)
    "volume": "CT abdomen (sample)",
    "segmentation": "Segmentation",
    "segment": "liver",
}


# ----------------------------------------------------------------------------------------- texts set at run time
def runtime_texts(module_file: Path = MODULE_FILE) -> dict[str, dict[str, str]]:
    """``{widget: {"text"|"toolTip"|"placeholderText": literal}}`` from the widget class of the module file: literal
    assignments ``self.ui.<w>.<prop> = _("...")`` / ``"..."`` and ``self.ui.<w>.setText(_("..."))``; the first one
    in the file wins (the set-up comes first)."""
    tree = ast.parse(module_file.read_text())
    widget = next(
        (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Widget")),
        None,
    )
    found: dict[str, dict[str, str]] = {}
    if widget is None:
        return found

    def literal(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_" and node.args:
            return literal(node.args[0])
        return None

    def ui_name(node: ast.AST) -> str | None:  # self.ui.<name>
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            return node.attr
        return None

    setters = {"setText": "text", "setToolTip": "toolTip", "setPlaceholderText": "placeholderText"}
    for node in sorted(ast.walk(widget), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        target = prop = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute):
            attribute = node.targets[0]
            target, prop, value = ui_name(attribute.value), attribute.attr, literal(node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in setters:
            target, prop = ui_name(node.func.value), setters[node.func.attr]
            value = literal(node.args[0]) if node.args else None
        if target and value is not None and prop in ("text", "toolTip", "placeholderText", "title"):
            found.setdefault(target, {}).setdefault(prop, value)
    return found


def panel_texts(module_file: Path = MODULE_FILE, texts_file: Path = TEXTS_FILE) -> dict[str, dict[str, str]]:
    """The texts the panel shows on a fresh CT: the module file's literal ones, then panel_texts.json on top."""
    texts = runtime_texts(module_file)
    if texts_file.is_file():
        for name, props in json.loads(texts_file.read_text()).items():
            if not name.startswith("_"):
                texts.setdefault(name, {}).update(props)
    return texts


# ------------------------------------------------------------------------------------------ the .ui with stand-ins
def qt_class(name: str, extends: dict[str, str]) -> str:
    """The Qt class drawn for a class of the .ui (itself when it is Qt's)."""
    seen = set()
    while name not in seen:
        seen.add(name)
        if name in STAND_INS:
            return STAND_INS[name]
        if name.startswith("Q") and name not in extends:
            return name
        name = extends.get(name, "QWidget")
    return "QWidget"


def ui_with_stand_ins(ui_text: str) -> tuple[bytes, dict[str, str]]:
    """The .ui with every Slicer/CTK widget replaced by its stand-in (a collapsible section's ``text`` becomes the
    group's ``title``, the Segment Editor a framed label naming it), and {object name: original class}."""
    root = ET.fromstring(ui_text)
    extends = {
        cw.findtext("class"): cw.findtext("extends") or "QWidget"
        for cw in root.iter("customwidget")
        if cw.findtext("class")
    }
    replaced: dict[str, str] = {}
    for element in root.iter("widget"):
        original = element.get("class", "QWidget")
        drawn = qt_class(original, extends)
        if drawn == original:
            continue
        replaced[element.get("name", "")] = original
        element.set("class", drawn)
        collapsed = any(
            prop.get("name") == "collapsed" and prop.findtext("bool") == "true" for prop in element.findall("property")
        )
        if drawn == "QGroupBox":  # a collapsible section: its arrow in the title; a collapsed one shows nothing else
            for prop in element.findall("property"):
                if prop.get("name") == "text" and prop.find("string") is not None:
                    prop.find("string").text = ("▸ " if collapsed else "▾ ") + (prop.findtext("string") or "")
            if collapsed:
                for child in list(element):
                    if child.tag in ("widget", "layout"):
                        element.remove(child)
                height = ET.SubElement(element, "property", name="maximumSize")
                size = ET.SubElement(height, "size")
                ET.SubElement(size, "width").text = "16777215"
                ET.SubElement(size, "height").text = "18"
        for prop in element.findall("property"):
            if drawn == "QGroupBox" and prop.get("name") == "text":
                prop.set("name", "title")
            elif prop.get("name") in (
                "collapsed",
                "nodeTypes",
                "noneEnabled",
                "addEnabled",
                "removeEnabled",
                "renameEnabled",
                "editEnabled",
                "showHidden",
                "filters",
                "SlicerParameterName",
            ):
                element.remove(prop)
        if original in PLACEHOLDERS:
            for child in list(element):
                if child.tag in ("widget", "layout"):
                    element.remove(child)
            text = ET.SubElement(element, "property", name="text")
            ET.SubElement(text, "string").text = PLACEHOLDERS[original]
            frame = ET.SubElement(element, "property", name="frameShape")
            ET.SubElement(frame, "enum").text = "QFrame::StyledPanel"
            height = ET.SubElement(element, "property", name="minimumSize")
            size = ET.SubElement(height, "size")
            ET.SubElement(size, "width").text = "0"
            ET.SubElement(size, "height").text = "150"
            align = ET.SubElement(element, "property", name="alignment")
            ET.SubElement(align, "set").text = "Qt::AlignCenter"
    custom = root.find("customwidgets")
    if custom is not None:
        root.remove(custom)
    connections = root.find("connections")  # signals of Slicer classes do not exist on the stand-ins
    if connections is not None:
        root.remove(connections)
    return ET.tostring(root, encoding="utf-8"), replaced


# ------------------------------------------------------------------------------------------------------ rendering
def render_panel(out: Path, texts: dict[str, dict[str, str]]) -> Path:
    """panel.png (needs PySide6; run inside the screenshots environment)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QFont, QFontDatabase
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QLabel, QWidget

    app = QApplication.instance() or QApplication(["render_screenshots"])
    import matplotlib  # its bundled DejaVu Sans: the same text everywhere, even where no system font is installed

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"):
        QFontDatabase.addApplicationFont(str(font_dir / name))
    app.setFont(QFont("DejaVu Sans", 9))
    data, replaced = ui_with_stand_ins(UI_FILE.read_text())
    array = QByteArray(data)  # kept referenced while the loader reads it
    buffer = QBuffer(array)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    if panel is None:
        raise SystemExit(f"render_screenshots: QUiLoader could not load {UI_FILE}: {loader.errorString()}")
    for name, props in texts.items():
        widget = panel.findChild(QWidget, name)
        if widget is None:
            continue
        if isinstance(widget, QComboBox) and props.get("items"):
            widget.clear()
            widget.addItems(list(props["items"]))
        for prop, value in props.items():
            setter = {
                "text": "setText",
                "toolTip": "setToolTip",
                "placeholderText": "setPlaceholderText",
                "title": "setTitle",
            }.get(prop)
            if setter and hasattr(widget, setter):
                getattr(widget, setter)(value)
    for name, original in replaced.items():
        widget = panel.findChild(QWidget, name)
        if isinstance(widget, QComboBox) and widget.count() == 0:
            key = next((k for k in NODE_COMBO_TEXT if k in name.lower()), None)
            widget.addItem(NODE_COMBO_TEXT[key] if key else original)
        if isinstance(widget, QLabel) and original in PLACEHOLDERS:
            widget.setStyleSheet("QLabel { background: #f0f0f0; color: #555; border: 1px dashed #999; }")
    panel.resize(PANEL_WIDTH, 100)
    panel.adjustSize()
    panel.resize(PANEL_WIDTH, panel.sizeHint().height())
    path = out / "panel.png"
    panel.grab().save(str(path), "PNG")
    app.processEvents()
    return path


def _read_case(demo_dir: Path, structure: str):
    """CT (Hounsfield), demo mask and reference label on the CT's grid, as numpy (z, y, x) arrays, and the spacing."""
    import numpy as np
    import SimpleITK as sitk

    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    case = manifest["cases"][0]
    ct = sitk.ReadImage(str(SAMPLE / case["image"]))
    label = sitk.ReadImage(str(SAMPLE / case["label"]))
    value = int(next(k for k, v in case["labels"].items() if v == structure))
    seg = sitk.ReadImage(str(demo_dir / f"{structure}.seg.nrrd"))
    if seg.GetNumberOfComponentsPerPixel() > 1:
        seg = sitk.VectorIndexSelectionCast(seg, 0)
    mask = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    label = sitk.Resample(label, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return (
        sitk.GetArrayFromImage(ct).astype(np.float32),
        sitk.GetArrayFromImage(mask) > 0,
        sitk.GetArrayFromImage(label) == value,
        ct.GetSpacing(),
    )


def render_slices(out: Path, demo_dir: Path, structure: str, caption: str) -> Path:
    """result_slices.png: three planes through the mask's centre, CT window W400/L40, outlines of mask and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ct, mask, truth, (sx, sy, sz) = _read_case(demo_dir, structure)
    k, j, i = (int(c + 0.5) for c in np.argwhere(mask if mask.any() else truth).mean(axis=0))
    window = np.clip((ct - (40 - 200)) / 400, 0, 1)
    # arrays are (z, y, x) in LPS: x to the patient's left, y to posterior, z to superior
    planes = [
        ("axial", window[k], mask[k], truth[k], (0, ct.shape[2] * sx, ct.shape[1] * sy, 0), ("R", "L", "A", "P")),
        (
            "coronal",
            window[:, j, :],
            mask[:, j, :],
            truth[:, j, :],
            (0, ct.shape[2] * sx, 0, ct.shape[0] * sz),
            ("R", "L", "S", "I"),
        ),
        (
            "sagittal",
            window[:, :, i],
            mask[:, :, i],
            truth[:, :, i],
            (0, ct.shape[1] * sy, 0, ct.shape[0] * sz),
            ("A", "P", "S", "I"),
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 4.0), dpi=90, gridspec_kw={"width_ratios": [1, 1, 1]})
    for ax, (name, image, m, t, extent, (left, right, top, bottom)) in zip(axes, planes):
        origin = "upper" if name == "axial" else "lower"
        ax.imshow(image, cmap="gray", extent=extent, origin=origin, interpolation="bilinear")
        ys = (
            np.linspace(extent[3], extent[2], image.shape[0])
            if origin == "upper"
            else np.linspace(extent[2], extent[3], image.shape[0])
        )
        xs = np.linspace(extent[0], extent[1], image.shape[1])
        if t.any():
            ax.contour(xs, ys, t.astype(float), levels=[0.5], colors="#4fc3f7", linewidths=1.0, linestyles="--")
        if m.any():
            ax.contour(xs, ys, m.astype(float), levels=[0.5], colors="#ffd54f", linewidths=1.6)
        if name != "axial":  # the sample is a slab: show the region around the structure, not the whole width
            columns = np.flatnonzero((m | t).any(axis=0))
            if columns.size:
                step = (extent[1] - extent[0]) / image.shape[1]
                ax.set_xlim(max(extent[0], columns[0] * step - 40), min(extent[1], (columns[-1] + 1) * step + 40))
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        for x, y, text in ((0.02, 0.5, left), (0.98, 0.5, right), (0.5, 0.97, top), (0.5, 0.03, bottom)):
            ax.text(x, y, text, transform=ax.transAxes, color="white", fontsize=8, ha="center", va="center")
    fig.suptitle(caption, fontsize=9)
    fig.text(
        0.5,
        0.02,
        "yellow: MAISSegment's mask   dashed blue: reference label (TotalSegmentator)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.93))
    path = out / "result_slices.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def render_surface(out: Path, demo_dir: Path, structure: str, caption: str) -> Path:
    """result_3d.png: the demo mask's surface (marching cubes at the voxel size of the CT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from skimage.measure import marching_cubes

    _, mask, _, (sx, sy, sz) = _read_case(demo_dir, structure)
    padded = np.pad(mask, 1).astype(np.float32)  # closed surface at the slab's first and last slice
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=(sz, sy, sx))
    xyz = verts[:, ::-1]  # (x, y, z) in mm
    fig = plt.figure(figsize=(5.5, 4.6), dpi=90)
    ax = fig.add_subplot(projection="3d")
    triangles = xyz[faces]
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-9
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    shade = 0.35 + 0.65 * np.abs(normals @ light)
    colors = np.clip(np.outer(shade, [0.95, 0.78, 0.30]), 0, 1)
    ax.add_collection3d(Poly3DCollection(triangles, facecolors=colors, edgecolor="none"))
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])  # anterior towards the viewer's top
    ax.set_zlim(lo[2], hi[2])
    ax.set_box_aspect(hi - lo)
    ax.view_init(elev=25, azim=-60)
    ax.set_xlabel("R → L (mm)", fontsize=8)
    ax.set_ylabel("A → P (mm)", fontsize=8)
    ax.set_zlabel("I → S (mm)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(caption.replace(": Dice", ":\nDice", 1), fontsize=9)
    fig.tight_layout()
    path = out / "result_3d.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def shrink_png(path: Path, max_bytes: int = MAX_BYTES) -> int:
    """Keep a PNG under ``max_bytes`` (palette of 256 colours when needed); returns its size."""
    from PIL import Image

    if path.stat().st_size > max_bytes:
        with Image.open(path) as image:
            image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    size = path.stat().st_size
    if size > max_bytes:
        raise SystemExit(f"render_screenshots: {path} is {size} bytes (over {max_bytes})")
    return size


# --------------------------------------------------------------------------------------- the two environments
def demo_caption(log: str, structure: str) -> str:
    """'liver, 10 simulated clicks: Dice 0.26 (built-in model mais-small-shared)' from `mais demo`'s output."""
    clicks = re.findall(r"^click\s+(\d+).*Dice ([0-9.]+)", log, re.M)
    model = re.search(r"^model: (\S+)", log, re.M)
    if not clicks:
        return f"{structure} (mais demo)"
    n, dice = clicks[-1]
    return (
        f"{structure}, {int(n)} simulated clicks of `mais demo`: Dice {float(dice):.2f} "
        f"(model {model.group(1) if model else '?'}, sample CT slab)"
    )


def run_demo(demo_dir: Path, structure: str, clicks: int) -> str:
    mais = ROOT / ".venv" / "bin" / "mais"
    command = [str(mais), "demo", "--out", str(demo_dir), "--structure", structure, "--clicks", str(clicks)]
    proc = subprocess.run(["nice", "-n", "15", *command], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"render_screenshots: `{' '.join(command)}` failed:\n{proc.stderr[-2000:]}")
    (demo_dir / "demo.log").write_text(proc.stdout)
    return proc.stdout


def ensure_render_env() -> Path:
    """The screenshots environment's Python (created and filled on first use)."""
    python = VENV / "bin" / "python"
    probe = "import PySide6.QtUiTools, skimage.measure, SimpleITK, matplotlib"
    if python.is_file() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"render_screenshots: installing {', '.join(RENDER_PACKAGES)} into {VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *RENDER_PACKAGES], check=True
    )
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("panel", "results"), help="render only the panel or only the results")
    parser.add_argument("--demo-dir", type=Path, help="a `mais demo --out` folder to reuse (default: run it)")
    parser.add_argument("--structure", default="liver", help="the demo's structure (default liver)")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", type=Path, help=argparse.SUPPRESS)  # internal: job file, in the screenshots env
    args = parser.parse_args(argv)

    if args.render:  # second stage, inside the screenshots environment
        job = json.loads(args.render.read_text())
        out = Path(job["out"])
        made = []
        if job.get("texts") is not None:
            made.append(render_panel(out, job["texts"]))
        if job.get("demo_dir"):
            demo_dir = Path(job["demo_dir"])
            made.append(render_slices(out, demo_dir, job["structure"], job["caption"]))
            made.append(render_surface(out, demo_dir, job["structure"], job["caption"]))
        for path in made:
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({shrink_png(path)} bytes)")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    job: dict = {"out": str(args.out.resolve()), "structure": args.structure}
    with tempfile.TemporaryDirectory(prefix="mais_screenshots_") as tmp:
        if args.only != "results":
            job["texts"] = panel_texts()
        if args.only != "panel":
            demo_dir = args.demo_dir or Path(tmp) / "demo"
            if args.demo_dir is None:
                log = run_demo(demo_dir, args.structure, args.clicks)
            else:
                log_file = demo_dir / "demo.log"
                log = log_file.read_text() if log_file.is_file() else ""
            job["demo_dir"], job["caption"] = str(demo_dir.resolve()), demo_caption(log, args.structure)
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        python = ensure_render_env()
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
        return subprocess.run(
            [str(python), str(Path(__file__).resolve()), "--render", str(job_file)], env=env
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
