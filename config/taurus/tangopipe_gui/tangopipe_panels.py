"""The tangopipe GUI's own panels: pipeline overview, latest image, scan control.

Each is built from the GUI spec (see ``devices/gui.py``); the Taurus widgets in
them subscribe to change events of the pipeline's devices.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pyqtgraph as pg
from taurus.external.qt import QtCore, QtWidgets
from taurus.qt.qtgui.button import TaurusCommandButton
from taurus.qt.qtgui.panel import TaurusForm
from taurus_pyqtgraph import TaurusTrend
from taurus_pyqtgraph.taurusimageitem import TaurusImageItem

OVERVIEW_COLUMNS = 2


class PipelineOverview(QtWidgets.QScrollArea):
    """One TaurusForm per device (State, Status, counters), upstream first."""

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.forms: dict[str, TaurusForm] = {}
        self._spec: dict[str, Any] = {}

    @property
    def spec(self) -> dict[str, Any]:
        return self._spec

    @spec.setter
    def spec(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        inner = QtWidgets.QWidget()
        grid = QtWidgets.QGridLayout(inner)
        grid.setContentsMargins(2, 2, 2, 2)
        self.forms = {}
        for n, device in enumerate(spec["devices"]):
            box = QtWidgets.QGroupBox(f"{device['name']}  ({device['class']})")
            layout = QtWidgets.QVBoxLayout(box)
            layout.setContentsMargins(2, 2, 2, 2)
            form = TaurusForm(box, withButtons=False)
            form.setModel(spec["forms"][device["name"]])
            form.setMinimumHeight(
                form.scrollArea.widget().sizeHint().height() + 8
            )  # every row, no inner scroll
            layout.addWidget(form)
            grid.addWidget(box, n // OVERVIEW_COLUMNS, n % OVERVIEW_COLUMNS, QtCore.Qt.AlignTop)
            self.forms[device["name"]] = form
        self.setWidget(inner)


class PipelineTrend(TaurusTrend):
    """A TaurusTrend whose curves are named "device attribute" (not just the attribute)."""

    def setModel(self, names: Any, **kwargs: Any) -> None:
        super().setModel(names)
        for trend_set in self.getTrendSets():
            model = trend_set.getModelName()
            path = model.split("://", 1)[-1].split("/")[1:]  # [domain, family, member, attribute]
            if len(path) < 4:
                continue
            label = f"{path[1]}/{path[2]} {path[3]}"
            trend_set.opts["name"] = label  # for curves made later
            for curve in trend_set:  # made already by the first read
                curve.setData(name=label)
                legend_label = self.getPlotItem().legend.getLabel(curve)
                if legend_label is not None:
                    legend_label.setText(label)


class LatestImageItem(TaurusImageItem):
    """TaurusImageItem that shows nothing (rather than failing) while the sink has no image."""

    def handleEvent(self, evt_src: Any, evt_type: Any, evt_val: Any) -> None:
        value = getattr(evt_val, "rvalue", None)
        if value is not None and getattr(value, "size", 1) == 0:
            self.clear()
            return
        super().handleEvent(evt_src, evt_type, evt_val)


class LatestImagePanel(QtWidgets.QWidget):
    """The sink's LatestImage, upright (rows down, columns across), with a colour scale."""

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.view = pg.GraphicsLayoutWidget()
        self.plot = self.view.addPlot()
        self.plot.invertY(True)  # row 0 at the top, as detector images are drawn
        self.plot.setAspectLocked(True)
        self.image = LatestImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.histogram = pg.HistogramLUTItem()
        self.histogram.setImageItem(self.image)
        self.view.addItem(self.histogram)
        layout.addWidget(self.view)

    def setModel(self, model: str, **kwargs: Any) -> None:
        self.image.setModel(model)

    def getModel(self) -> str:
        return self.image.getModelName()


class ScanControlPanel(QtWidgets.QWidget):
    """StartScan (with JSON metadata) and EndScan on the master; workers per group."""

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self._spec: dict[str, Any] = {}
        self.process: QtCore.QProcess | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return self._spec

    @spec.setter
    def spec(self, spec: dict[str, Any]) -> None:
        from devices.gui import model

        self._spec = spec
        master = model(spec["tango_host"], spec["master"])
        layout = QtWidgets.QFormLayout(self)
        self.metadata = QtWidgets.QLineEdit('{"frames": 100}')
        self.metadata.setToolTip("StartScan metadata, JSON: scan_id, frames, scan_shape, motors, poni, ...")
        layout.addRow("scan metadata", self.metadata)
        buttons = QtWidgets.QHBoxLayout()
        self.start = TaurusCommandButton(
            command="StartScan", parameters=[self.metadata.text()], text="StartScan"
        )
        self.start.setModel(master)
        self.metadata.textChanged.connect(lambda text: self.start.setParameters([text]))
        self.end = TaurusCommandButton(command="EndScan", text="EndScan")
        self.end.setModel(master)
        buttons.addWidget(self.start)
        buttons.addWidget(self.end)
        layout.addRow("master", buttons)
        self.answer = QtWidgets.QLabel("")
        self.start.commandExecuted.connect(lambda r: self.answer.setText(f"scan {r} started"))
        self.end.commandExecuted.connect(lambda r: self.answer.setText(f"scan ended after {r} frames"))
        layout.addRow("", self.answer)

        scale = QtWidgets.QHBoxLayout()
        self.group = QtWidgets.QComboBox()
        self.group.addItems(list(spec["groups"]))
        self.workers = QtWidgets.QSpinBox()
        self.workers.setRange(0, 64)
        self.workers.setValue(next(iter(spec["groups"].values()), 1))
        self.group.currentTextChanged.connect(lambda g: self.workers.setValue(spec["groups"].get(g, 1)))
        self.apply = QtWidgets.QPushButton("Scale")
        self.apply.setToolTip("start or stop workers of the group (tangopipe scale), also during a scan")
        self.apply.clicked.connect(self.scale)
        scale.addWidget(self.group)
        scale.addWidget(self.workers)
        scale.addWidget(self.apply)
        layout.addRow("workers", scale)
        self.scale_output = QtWidgets.QLabel("")
        self.scale_output.setWordWrap(True)
        layout.addRow("", self.scale_output)

    def scale(self) -> None:
        """Run ``tangopipe scale`` for the chosen group (the session knows what runs)."""
        if self.process is not None and self.process.state() != QtCore.QProcess.NotRunning:
            return
        self.process = QtCore.QProcess(self)
        self.process.setProcessChannelMode(QtCore.QProcess.MergedChannels)
        args = ["-m", "devices.cli", "scale", self._spec["config"], "workers", str(self.workers.value()),
                "--group", self.group.currentText()]  # fmt: skip
        self.process.finished.connect(self._scaled)
        self.apply.setEnabled(False)
        self.scale_output.setText("scaling ...")
        self.process.start(sys.executable, args)

    def _scaled(self, code: int, *_: Any) -> None:
        assert self.process is not None
        text = bytes(self.process.readAll()).decode(errors="replace").strip()
        try:
            result = json.loads(text)
            text = f"added {result['added']}, removed {result['removed']}"
            self._spec["groups"][result["group"]] = result["workers"]
        except (ValueError, KeyError):
            pass
        self.scale_output.setText(text if code == 0 else f"failed: {text}")
        self.apply.setEnabled(True)
