"""``scripts/render_screenshots.py`` without drawing (no PySide6 or scikit-image here): the panel's texts taken from
the module file and ``docs/screenshots/panel_texts.json``, the ``.ui`` rewritten with Qt stand-ins for Slicer's
widgets, the demo caption; and the committed pictures themselves."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import TESTING

ROOT = TESTING.parent
SHOTS = ROOT / "docs" / "screenshots"
sys.path.insert(0, str(ROOT / "scripts"))
import render_screenshots as rs  # noqa: E402


def test_runtime_texts_are_the_first_literal_ones_the_widget_sets(tmp_path):
    module = tmp_path / "Module.py"
    module.write_text(
        "class ModuleWidget:\n"
        "    def setup(self):\n"
        "        self.ui.statusLabel.text = _('Ready.')\n"
        "        self.ui.applyButton.setToolTip(_('Run it'))\n"
        "        self.ui.nameEdit.placeholderText = 'name'\n"
        "        self.ui.hintLabel.text = compute()  # not a literal: from panel_texts.json\n"
        "    def later(self):\n"
        "        self.ui.statusLabel.text = _('Done.')\n"
        "        self.other.text = 'not the panel'\n"
    )
    assert rs.runtime_texts(module) == {
        "statusLabel": {"text": "Ready."},
        "applyButton": {"toolTip": "Run it"},
        "nameEdit": {"placeholderText": "name"},
    }
    overrides = tmp_path / "texts.json"
    overrides.write_text(json.dumps({"_comment": "x", "hintLabel": {"text": "Pick a segment"}}))
    texts = rs.panel_texts(module, overrides)
    assert texts["hintLabel"] == {"text": "Pick a segment"} and "_comment" not in texts


def test_the_panel_texts_file_names_widgets_of_the_ui():
    names = {w.get("name") for w in ET.fromstring(rs.UI_FILE.read_text()).iter("widget")}
    texts = json.loads(rs.TEXTS_FILE.read_text())
    assert {k for k in texts if not k.startswith("_")} <= names


def test_slicer_widgets_become_qt_stand_ins_with_their_labels():
    ui = """<ui version="4.0"><class>M</class>
     <widget class="qMRMLWidget" name="M"><layout class="QVBoxLayout" name="l">
      <item><widget class="ctkCollapsibleButton" name="pointsSection">
        <property name="text"><string>Points</string></property>
        <layout class="QVBoxLayout" name="l2"><item><widget class="QPushButton" name="includeButton"/></item></layout>
      </widget></item>
      <item><widget class="ctkCollapsibleButton" name="advanced">
        <property name="text"><string>Advanced</string></property>
        <property name="collapsed"><bool>true</bool></property>
        <layout class="QVBoxLayout" name="l3"><item><widget class="qMRMLNodeComboBox" name="volumeSelector">
          <property name="nodeTypes"><stringlist><string>vtkMRMLScalarVolumeNode</string></stringlist></property>
        </widget></item></layout>
      </widget></item>
      <item><widget class="qMRMLSegmentEditorWidget" name="editor"/></item>
      <item><widget class="myCustomSlider" name="slider"/></item>
     </layout></widget>
     <customwidgets>
      <customwidget><class>myCustomSlider</class><extends>ctkSliderWidget</extends></customwidget>
      <customwidget><class>qMRMLWidget</class><extends>QWidget</extends></customwidget>
     </customwidgets>
     <connections><connection><sender>M</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal></connection></connections>
    </ui>"""
    data, replaced = rs.ui_with_stand_ins(ui)
    root = ET.fromstring(data)
    classes = {w.get("name"): w.get("class") for w in root.iter("widget")}
    assert classes == {"M": "QWidget", "pointsSection": "QGroupBox", "advanced": "QGroupBox", "editor": "QLabel",
                       "slider": "QDoubleSpinBox", "includeButton": "QPushButton"}  # fmt: skip
    assert replaced["slider"] == "myCustomSlider" and replaced["editor"] == "qMRMLSegmentEditorWidget"
    titles = {w.get("name"): w.find("property[@name='title']/string").text for w in root.iter("widget")
              if w.get("class") == "QGroupBox"}  # fmt: skip
    assert titles == {"pointsSection": "▾ Points", "advanced": "▸ Advanced"}  # a collapsed section shows its title
    assert "Segment Editor" in root.find(".//widget[@name='editor']/property[@name='text']/string").text
    assert root.find("customwidgets") is None and root.find("connections") is None


def test_the_modules_ui_renders_with_qt_classes_only():
    data, replaced = rs.ui_with_stand_ins(rs.UI_FILE.read_text())
    classes = {w.get("class") for w in ET.fromstring(data).iter("widget")}
    assert all(c.startswith("Q") for c in classes), classes
    assert set(replaced.values()) and all(not c.startswith("Q") for c in replaced.values())


def test_the_caption_quotes_the_demos_last_dice():
    log = (
        "model: mais-small-shared (maissegment)\nclick  1 (+) at IJK (1, 2, 3): Dice 0.085\nclick 10 (+) at: Dice 0.203"
    )
    caption = rs.demo_caption(log, "liver")
    assert caption.startswith("liver, 10 simulated clicks") and "Dice 0.20" in caption
    assert "mais-small-shared" in caption and rs.demo_caption("", "liver") == "liver (mais demo)"


@pytest.mark.parametrize("name", ["panel.png", "result_slices.png", "result_3d.png"])
def test_the_committed_pictures_are_small_pngs(name):
    data = (SHOTS / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < rs.MAX_BYTES
