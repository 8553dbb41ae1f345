"""Taurus GUI of a tangopipe pipeline (a taurusgui configuration module).

The pipeline comes from ``$TANGOPIPE_GUI``: the GUI spec that ``tangopipe gui``
writes (device names from the pipeline definition), or a pipeline YAML file
with TANGO_HOST set. Run it with ``tangopipe gui CONFIG``, or with plain Taurus:

    TANGOPIPE_GUI=config/demo.yaml TANGO_HOST=host:port taurus gui config/taurus/tangopipe_gui
"""

import os
import sys
from pathlib import Path

from taurus.qt.qtgui.taurusgui.utils import PanelDescription

import devices.gui
from devices.gui import load_spec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tangopipe_panels beside this file

SPEC = load_spec()

GUI_NAME = f"tangopipe-{SPEC['pipeline']}"
ORGANIZATION = "tangopipe"
SINGLE_INSTANCE = False
MANUAL_URI = (Path(devices.gui.__file__).resolve().parent.parent / "README.md").as_uri()

overview = PanelDescription(
    "Pipeline",
    floating=False,
    classname="tangopipe_panels:PipelineOverview",
    widget_properties={"spec": SPEC},
)
rates = PanelDescription(
    "Rates",
    floating=False,
    classname="tangopipe_panels:PipelineTrend",
    model=SPEC["trends"]["Rates"],
)
queues = PanelDescription(
    "Queues",
    floating=False,
    classname="tangopipe_panels:PipelineTrend",
    model=SPEC["trends"]["Queues"],
)
if SPEC["spectrum"]:
    spectrum = PanelDescription(
        "Spectrum",
        floating=False,
        classname="taurus_pyqtgraph:TaurusPlot",
        model=[SPEC["spectrum"]],
    )
if SPEC["image"]:
    image = PanelDescription(
        "Image",
        floating=False,
        classname="tangopipe_panels:LatestImagePanel",
        model=SPEC["image"],
    )
scan = PanelDescription(
    "Scan",
    floating=False,
    classname="tangopipe_panels:ScanControlPanel",
    widget_properties={"spec": SPEC},
)
