"""``tangopipe gui``: the Taurus GUI of a pipeline, generated from its definition.

The GUI is a taurusgui configuration (``config/taurus/tangopipe_gui``) that reads
a *GUI spec*: a small JSON file naming the pipeline's devices and the Tango
attributes each panel shows. ``tangopipe gui CONFIG`` writes the spec for the
pipeline that is up (device names from the definition, TANGO_HOST from the
session) into the state folder and opens the GUI; the same configuration runs
with plain Taurus as ``TANGOPIPE_GUI=SPEC.json taurus gui config/taurus/tangopipe_gui``
(``TANGOPIPE_GUI`` may also name the pipeline YAML, with TANGO_HOST set).

Panels: the pipeline overview (a TaurusForm per device: State, Status and its
counters), trends of rates and of queue depths, the sink's latest spectrum and
image, and scan control (StartScan, EndScan, worker scaling). Every attribute
shown is one the device pushes as change events, so nothing falls back to
Taurus' slow client polling.

    tangopipe gui config/demo.yaml
    tangopipe gui --screenshot status.png --after 5     # headless: a PNG of the GUI, then exit
    tangopipe plot data/demo_scan00001.h5 [--dataset NAME] [--out PNG]   # a scan file at a glance
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.definition import PipelineDefinition, load_definition

from .database import DeploymentError

#: The taurusgui configuration this module feeds.
GUI_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config" / "taurus" / "tangopipe_gui"
#: Environment variable naming the GUI spec (JSON) or a pipeline definition (YAML).
SPEC_ENV = "TANGOPIPE_GUI"

COMMON_ATTRIBUTES = (
    "State",
    "Status",
    "FramesIn",
    "FramesOut",
    "InputRateHz",
    "OutputRateHz",
    "QueueDepth",
    "InFlight",
    "DroppedFrames",
    "BadMessages",
    "Errors",
    "LatencyP99Ms",
)
#: Form rows per device class, after the common ones (all pushed as change events).
CLASS_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "PipelineMaster": ("Workers", "ScanFrames", "Redispatched"),
    "PipelineWorker": ("ProcessingErrors", "ConfigVersion"),
    "PipelineSorter": ("Consumers", "Backlog", "MissingFrames", "Duplicates"),
    "PipelineSink": ("LatestIndex", "StoredBytes", "Datasets", "Evictions"),
    "PipelineWriter": ("FramesWritten", "ScansDone"),
    "LavueBridge": ("Address", "PublishRateHz", "Published", "Skipped", "PublishedRateHz"),
}


def model(tango_host: str, device: str, attribute: str = "") -> str:
    """A Taurus model name with its authority, so the GUI needs no TANGO_HOST."""
    name = f"tango://{tango_host}/{device}"
    return f"{name}/{attribute}" if attribute else name


def gui_spec(definition: PipelineDefinition, tango_host: str, config: str = "") -> dict[str, Any]:
    """What the GUI shows for ``definition`` running on ``tango_host`` (JSON-ready).

    Keys: ``pipeline``, ``tango_host``, ``config``, ``devices`` ([{name, class,
    role}] upstream first), ``forms`` ({device: [attribute models]}), ``trends``
    ({"Rates": [...], "Queues": [...]}), ``spectrum`` and ``image`` (models or
    ""), ``master``, ``groups`` ({group: workers}).
    """
    specs = definition.devices()
    forms = {
        s.name: [model(tango_host, s.name, a) for a in (*COMMON_ATTRIBUTES, *CLASS_ATTRIBUTES.get(s.cls, ()))]
        for s in specs
    }
    rates, queues = [], []
    for s in specs:
        if s.cls in ("PipelineMaster", "PipelineWorker", "PipelineSorter"):
            rates.append(model(tango_host, s.name, "OutputRateHz"))
            queues.append(model(tango_host, s.name, "QueueDepth"))
        elif s.cls in ("PipelineSink", "PipelineWriter"):
            rates.append(model(tango_host, s.name, "InputRateHz"))
        elif s.cls == "LavueBridge":
            rates.append(model(tango_host, s.name, "PublishedRateHz"))
        if s.cls == "PipelineMaster":
            queues.append(model(tango_host, s.name, "InFlight"))
        elif s.cls == "PipelineSorter":
            queues.append(model(tango_host, s.name, "Backlog"))
    sink = definition.sink_name if definition.sink is not None else ""
    return {
        "pipeline": definition.name,
        "tango_host": tango_host,
        "config": config or str(definition.path),
        "devices": [{"name": s.name, "class": s.cls, "role": s.role} for s in specs],
        "forms": forms,
        "trends": {"Rates": rates, "Queues": queues},
        "spectrum": model(tango_host, sink, "LatestSpectrum") if sink else "",
        "image": model(tango_host, sink, "LatestImage") if sink else "",
        "master": definition.master_name,
        "groups": {name: g["workers"] for name, g in definition.groups.items()},
    }


def spec_models(spec: dict[str, Any]) -> list[str]:
    """Every attribute model the GUI subscribes to (forms, trends, spectrum, image)."""
    names = [m for models in spec["forms"].values() for m in models]
    names += [m for models in spec["trends"].values() for m in models]
    names += [m for m in (spec["spectrum"], spec["image"]) if m]
    return list(dict.fromkeys(names))


def write_spec(spec: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return path


def load_spec(source: str | os.PathLike | None = None) -> dict[str, Any]:
    """The GUI spec from ``source`` or ``$TANGOPIPE_GUI``: a spec JSON, or a pipeline
    YAML (then TANGO_HOST names the database)."""
    source = source or os.environ.get(SPEC_ENV, "")
    if not source:
        raise RuntimeError(
            f"no pipeline given: set {SPEC_ENV} to a GUI spec (tangopipe gui writes one) or a pipeline "
            "YAML file, or run 'tangopipe gui CONFIG'"
        )
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml"):
        tango_host = os.environ.get("TANGO_HOST", "")
        if not tango_host:
            raise RuntimeError(f"{SPEC_ENV}={source} is a pipeline definition: set TANGO_HOST too")
        return gui_spec(load_definition(path), tango_host, str(path.resolve()))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{SPEC_ENV}={source}: cannot read the GUI spec: {exc}") from exc


# -- running the GUI -----------------------------------------------------------------------
def create_gui(spec_path: str | os.PathLike, settings: str | os.PathLike | None = None) -> Any:
    """The TaurusGui of the spec at ``spec_path`` (a Qt application must exist)."""
    from taurus.qt.qtgui.taurusgui import TaurusGui

    os.environ[SPEC_ENV] = str(spec_path)
    spec = load_spec(spec_path)
    os.environ.setdefault("TANGO_HOST", spec["tango_host"])
    gui = TaurusGui(None, confname=str(GUI_CONFIG_DIR), settingsname=str(settings) if settings else None)
    gui.setWindowTitle(f"tangopipe: {spec['pipeline']} (TANGO_HOST={spec['tango_host']})")
    arrange_panels(gui)
    return gui


def arrange_panels(gui: Any) -> None:
    """The default layout: the overview on the left; on the right the latest image,
    the spectrum, the trends (tabs) and scan control (Taurus would tab every panel
    together; a saved perspective replaces this)."""
    from taurus.external.qt import Qt

    panels = {name: gui.getPanel(name) for name in gui.getPanelNames()}
    for panel in panels.values():
        gui.removeDockWidget(panel)  # out of Taurus' tab stack
    placed = {}
    for name, area in (("Pipeline", Qt.Qt.LeftDockWidgetArea), *((n, Qt.Qt.RightDockWidgetArea) for n in
                       ("Image", "Spectrum", "Rates", "Queues", "Scan", "Manual"))):  # fmt: skip
        panel = panels.get(name)
        if panel is not None:
            gui.addDockWidget(area, panel)
            panel.show()
            placed[name] = panel
    column = [placed[n] for n in ("Image", "Spectrum", "Rates", "Scan") if n in placed]
    for upper, lower in zip(column, column[1:], strict=False):
        gui.splitDockWidget(upper, lower, Qt.Qt.Vertical)
    for tab, under in (("Queues", "Rates"), ("Manual", "Scan")):
        if tab in placed and under in placed:
            gui.tabifyDockWidget(placed[under], placed[tab])
            placed[under].raise_()
    weights = {"Image": 3, "Spectrum": 2, "Rates": 3, "Scan": 1}

    def sizes() -> None:  # once the window has its size
        if "Pipeline" in placed and column:
            gui.resizeDocks([placed["Pipeline"], column[0]], [gui.width() * 3 // 5, gui.width() * 2 // 5],
                            Qt.Qt.Horizontal)  # fmt: skip
        gui.resizeDocks(column, [weights[n] * 100 for n in ("Image", "Spectrum", "Rates", "Scan") if n in placed],
                        Qt.Qt.Vertical)  # fmt: skip

    sizes()
    Qt.QTimer.singleShot(0, sizes)


def save_screenshot(widget: Any, path: str | os.PathLike) -> bool:
    """Save ``widget`` as a PNG of its size in pixels (whatever the screen's pixel ratio)."""
    image = widget.grab().toImage()
    if (image.width(), image.height()) != (widget.width(), widget.height()):
        image = image.scaled(widget.width(), widget.height())
    return bool(image.save(str(path), "PNG"))


def qt_application() -> Any:
    """The running Qt application, or a new TaurusApplication (headless when there is no display)."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from taurus.external.qt import QtWidgets

    app = QtWidgets.QApplication.instance()
    if app is None:
        from taurus.qt.qtgui.application import TaurusApplication

        app = TaurusApplication(cmd_line_parser=None, app_name="tangopipe-gui", org_name="tangopipe")
    return app


def run_gui(
    spec_path: str | os.PathLike,
    settings: str | os.PathLike | None = None,
    screenshot: str | os.PathLike | None = None,
    after_s: float = 5.0,
    size: tuple[int, int] = (1600, 1000),
) -> int:
    """Show the GUI until closed; with ``screenshot``, save it as PNG after ``after_s`` seconds and exit."""
    import taurus
    from taurus.external.qt import QtCore

    app = qt_application()
    taurus.setLogLevel(taurus.Error)  # devices' units ("frames") are not pint units: harmless warnings
    gui = create_gui(spec_path, settings)
    gui.resize(*size)
    gui.show()
    status = {"code": 0}
    if screenshot is not None:
        gui.SAVE_SETTINGS_ON_CLOSE = False

        def grab() -> None:
            if not save_screenshot(gui, screenshot):
                print(f"tangopipe: cannot write {screenshot}", file=sys.stderr)
                status["code"] = 1
            app.quit()

        QtCore.QTimer.singleShot(int(after_s * 1000), grab)
    code = app.exec_()
    return status["code"] or code


# -- the subcommand ------------------------------------------------------------------------
def cmd_gui(args: argparse.Namespace) -> int:
    from . import cli, deploy

    session, definition = cli._session_and_definition(args.config)
    spec = gui_spec(definition, session.tango_host, str(Path(session.config).resolve()))
    folder = deploy.state_folder()
    spec_path = write_spec(spec, folder / f"gui-{definition.name}.json")
    settings = Path(args.ini) if args.ini else folder / f"taurus-{definition.name}.ini"
    print(f"tangopipe: GUI of {definition.name} (spec {spec_path})", file=sys.stderr)
    return run_gui(spec_path, settings, args.screenshot, args.after)


def cmd_plot(args: argparse.Namespace) -> int:
    from pipelines.plots import quick_look

    try:
        out = quick_look(args.file, args.dataset, args.out, args.index)
    except (OSError, KeyError, ValueError) as exc:
        raise DeploymentError(f"plot {args.file}: {exc}") from None
    print(out)
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gui", help="the Taurus GUI of the pipeline: health, trends, latest results, scans"
    )
    p.add_argument("config", nargs="?", help="the pipeline definition (default: the one that is up)")
    p.add_argument(
        "--screenshot", metavar="PNG", help="save the window as PNG after --after seconds, then exit"
    )
    p.add_argument("--after", type=float, default=5.0, help="seconds before the screenshot (default 5)")
    p.add_argument("--ini", help="Taurus settings file (default: in the state folder)")
    p.set_defaults(func=cmd_gui)
    p = subparsers.add_parser("plot", help="a PNG of a scan file's default plot (or of one dataset)")
    p.add_argument("file", help="NeXus/HDF5 scan file written by a tangopipe writer")
    p.add_argument(
        "--dataset", help="dataset path (/entry/main/center_sum) or name in the default NXdata group"
    )
    p.add_argument("--index", type=int, help="frame to show for per-frame arrays (default: last valid / all)")
    p.add_argument("--out", help="PNG to write (default: FILE_DATASET.png beside the file)")
    p.set_defaults(func=cmd_plot)
