"""The tango_image source against the SimulatedCamera device: each in a real server.

The source alone talks to a camera run without database (tests/servers.py, full
TRL); a deployed pipeline reads a camera registered in its own database, also
when the camera's server is stopped in the middle of a scan and started again.
"""

import json
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import tango

from devices.database import database, pid_alive, register, stop_process
from devices.deploy import start_server
from devices.detector_sim import SimulatedCamera
from pipelines.definition import DeviceSpec, load_definition
from pipelines.sources import SOURCES, SourceError, load_source
from pipelines.sources.simulator import SimulatedDetector
from pipelines.sources.tango_image import TangoImageSource

from .conftest import Deployed, demo_config, pids_alive, tangopipe
from .servers import DeviceServerContext
from .waiting import wait_for

pytestmark = pytest.mark.slow

SHAPE = [48, 64]  # rows != columns: a transposed frame cannot pass
EXPOSURE_S = 0.02


def reference(shape=SHAPE) -> SimulatedDetector:
    """What the camera makes: frame i of every acquisition is reference().frame(i)."""
    return SimulatedDetector(shape=shape, dtype="uint16", rate_hz=0)


def camera_context(**properties) -> DeviceServerContext:
    props = {"Shape": SHAPE, **properties}
    return DeviceServerContext(SimulatedCamera, properties=props)


def acquire(camera, frames: int, exposure_s: float = EXPOSURE_S) -> None:
    camera.acq_nb_frames = frames
    camera.acq_expo_time = exposure_s
    camera.prepareAcq()
    camera.startAcq()


class Consumer(threading.Thread):
    """Takes one scan's frames as the master does, in a thread of its own."""

    def __init__(self, source: TangoImageSource, scan: dict):
        super().__init__(daemon=True)
        self.source, self.scan = source, scan
        self.frames: list = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for frame, meta in self.source.frames(self.scan):
                self.frames.append((frame, meta))
        except BaseException as exc:  # the test reports it
            self.error = exc


@pytest.fixture
def context():
    """A SimulatedCamera server without database; ``context.device`` is a proxy to it."""
    context = camera_context()
    context.start()
    context.device.set_timeout_millis(10000)
    try:
        yield context
    finally:
        context.stop()


# -- the simulator device --------------------------------------------------------------------


def test_camera_pushes_each_frame_and_follows_the_lima_sequence(context):
    camera = context.device
    assert camera.state() == tango.DevState.ON and camera.acq_status == "Ready"
    assert camera.image.shape == (0, 0) and camera.last_image_ready == -1
    camera.acq_nb_frames = 3
    with pytest.raises(tango.DevFailed, match="prepareAcq first"):
        camera.startAcq()
    seen = []
    event_id = camera.subscribe_event(
        "image", tango.EventType.CHANGE_EVENT, lambda e: None if e.err else seen.append(e.attr_value.value)
    )
    try:
        acquire(camera, 3, exposure_s=0.5)  # long enough to find it running
        assert camera.acq_status == "Running" and camera.state() == tango.DevState.RUNNING
        with pytest.raises(tango.DevFailed, match="stopAcq first"):
            camera.acq_nb_frames = 5
        wait_for(lambda: camera.acq_status == "Ready", what="the acquisition to end")
        wait_for(lambda: len(seen) == 4, what="the initial value and 3 image events")
    finally:
        camera.unsubscribe_event(event_id)
    assert camera.last_image_ready == 2 and camera.state() == tango.DevState.ON
    assert seen[0].shape == (0, 0)
    for i, image in enumerate(seen[1:]):
        assert image.dtype == np.uint16
        np.testing.assert_array_equal(image, reference().frame(i))
    with pytest.raises(tango.DevFailed, match="acq_nb_frames must be >= 0"):
        camera.acq_nb_frames = -1


def test_camera_with_a_bad_shape_is_in_fault_saying_why():
    with camera_context(Shape=[0, 10]) as camera:
        assert camera.state() == tango.DevState.FAULT
        assert "Shape" in camera.status() and "[0, 10]" in camera.status()
        with pytest.raises(tango.DevFailed, match="FAULT"):
            camera.prepareAcq()


# -- the source on its own ----------------------------------------------------------------------


def test_bad_parameters_are_named():
    assert SOURCES["tango_image"] == "pipelines.sources.tango_image:TangoImageSource"
    cases = [
        ({"device": "camera"}, "device"),
        ({"device": "a/b/c", "timeout_s": 0}, "timeout_s"),
        ({"device": "a/b/c", "queue_frames": 0}, "queue_frames"),
        ({"device": "a/b/c", "attribute": "a/b"}, "attribute"),
    ]
    for params, name in cases:
        with pytest.raises(ValueError, match=name):
            TangoImageSource(**params)
    with pytest.raises(SourceError, match="rate_hz"):
        load_source({"kind": "tango_image", "device": "a/b/c", "rate_hz": 3})


def test_source_takes_exactly_the_frames_of_the_scan_with_their_numbers(context):
    camera = context.device
    with TangoImageSource(device=context.get_device_access(), frames_attribute="last_image_ready") as source:
        assert source.wait_subscribed(60)
        # images while no scan runs are counted and let go
        acquire(camera, 3)
        wait_for(lambda: source.stats()["outside_scan"] == 3, what="3 images outside a scan")
        wait_for(lambda: camera.acq_status == "Ready", what="the first acquisition to end")
        frames = 25
        consumer = Consumer(source, {"frames": frames})
        consumer.start()
        wait_for(lambda: source.scanning, what="the scan to take images")
        acquire(camera, frames)
        consumer.join(120)
        assert not consumer.is_alive() and consumer.error is None
        stats = source.stats()
        assert not source.scanning
    assert len(consumer.frames) == frames
    for i, (frame, meta) in enumerate(consumer.frames):
        np.testing.assert_array_equal(frame, reference().frame(i))
        assert meta["frame_number"] == i
    times = [meta["event_time"] for _, meta in consumer.frames]
    assert times == sorted(times) and len(set(times)) == frames
    assert stats["frames"] == frames and stats["images"] == frames + 3
    assert stats["dropped"] == stats["missing_frames"] == stats["event_errors"] == 0
    assert source.describe()["shape"] == SHAPE and source.describe()["dtype"] == "uint16"


def test_source_drives_the_acquisition_and_counts_what_it_drops(context):
    camera = context.device
    with TangoImageSource(
        device=context.get_device_access(), start_acquisition=True, queue_frames=4
    ) as source:
        assert source.wait_subscribed(60)
        scan = source.frames({"frames": 20})
        first = next(scan)  # the camera was started for 20 frames; nobody takes the next ones yet
        assert camera.acq_nb_frames == 20
        wait_for(lambda: source.stats()["images"] == 20, what="all 20 images to arrive")
        rest = list(scan)  # the scan ends by itself: every image arrived
        stats = source.stats()
    got = [first, *rest]
    assert len(got) == 5  # the one taken, then the queue of 4
    for i, (frame, meta) in enumerate(got):
        np.testing.assert_array_equal(frame, reference().frame(i))
        assert "frame_number" not in meta and meta["event_time"] > 0
    assert stats["dropped"] == 15 and stats["frames"] == 5
    assert "queue of 4 images full" in source.last_error


def test_source_names_a_missing_attribute_and_an_absent_device(context):
    with TangoImageSource(
        device=context.get_device_access(), attribute="video_last_image", timeout_s=30
    ) as source:
        with pytest.raises(SourceError, match="no attribute 'video_last_image'") as info:
            list(source.frames({"frames": 1}))
        assert "image" in str(info.value)  # the attributes it has
    with TangoImageSource(device="tango://127.0.0.1:1/no/such/camera#dbase=no", timeout_s=1) as source:
        with pytest.raises(SourceError, match="cannot be reached within 1 s") as info:
            list(source.frames({"frames": 1}))
        assert "tango://127.0.0.1:1/no/such/camera" in str(info.value) and "start its server" in str(
            info.value
        )


def test_camera_stopped_mid_scan_is_counted_reported_and_the_scan_can_be_ended():
    context = camera_context()
    context.start()
    source = TangoImageSource(device=context.get_device_access(), timeout_s=2)
    try:
        try:
            assert source.wait_subscribed(60)
            consumer = Consumer(source, {})  # no frames given: until stopped
            consumer.start()
            wait_for(lambda: source.scanning, what="the scan to take images")
            acquire(context.device, 0)  # until stopAcq
            wait_for(lambda: len(consumer.frames) >= 5, what="5 frames")
        finally:
            context.stop()
        wait_for(lambda: source.stats()["device_lost"] == 1, timeout=60, what="the outage to be counted")
        error = source.last_error  # which check sees the outage first depends on timing
        assert ("does not answer" in error or "cannot be reached" in error) and "simulatedcamera" in error
        assert consumer.is_alive()  # the scan waits for the camera to come back
        source.stop()
        consumer.join(30)
        assert not consumer.is_alive() and consumer.error is None
        for i, (frame, _) in enumerate(consumer.frames):
            np.testing.assert_array_equal(frame, reference().frame(i))
        with pytest.raises(SourceError, match="cannot be reached within 2 s"):
            list(source.frames({"frames": 3}))  # a new scan without the camera fails clearly
    finally:
        source.close()


# -- a deployed pipeline reading a camera from its database --------------------------------------

CAMERA = DeviceSpec("tic/camera/1", "SimulatedCamera", "SimulatedCamera/tic", {}, "camera")
PIPELINE_SHAPE = [96, 128]


class Camera:
    """The SimulatedCamera server of a deployed pipeline (registered in its database)."""

    def __init__(self, pipeline: Deployed):
        self.pipeline = pipeline
        self.pid = 0
        db = database(pipeline.tango_host)
        register(db, load_definition(pipeline.config), [CAMERA])
        db.put_device_property(CAMERA.name, {"Shape": [str(n) for n in PIPELINE_SHAPE]})

    def start(self) -> None:
        self.pid = start_server(CAMERA.server, self.pipeline.tango_host, loopback=True)
        proxy = self.pipeline.proxy(CAMERA.name)
        wait_for(lambda: _answers(proxy), timeout=120, what="the camera server", period=0.2)

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid)
            self.pid = 0


def _answers(proxy) -> bool:
    try:
        return proxy.state() == tango.DevState.ON
    except tango.DevFailed:
        return False


@pytest.fixture(scope="module")
def camera_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tango_image")
    source = {
        "kind": "tango_image",
        "device": CAMERA.name,
        "frames_attribute": "last_image_ready",
        "start_acquisition": True,
        "timeout_s": 60.0,
    }
    config = demo_config(
        folder,
        name="tic",
        master={"source": source, "queue_capacity": 64, "overflow_policy": "block"},
        groups={"main": {"workers": 1, "numba_threads": 1, "credit": 2, "steps": ["passthrough"]}},
    )
    pipeline = Deployed(folder, config)
    camera = None
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TANGOPIPE_STATE", str(pipeline.state))  # the camera's log beside the others
            camera = Camera(pipeline)
            camera.start()
            yield pipeline, camera
    finally:
        if camera is not None:
            camera.stop()
        pipeline.down()
        pids = [pipeline.session["db_pid"], *pipeline.session["servers"].values()]
        wait_for(lambda: not pids_alive(pids), timeout=30, what="the pipeline's processes to end", period=0.1)


def scan_of_50_frames_is_written_completely(pipeline: Deployed) -> None:
    frames = 50
    out = tangopipe(
        "scan", "--frames", str(frames), env=pipeline.env, cwd=pipeline.folder, timeout=300
    ).stdout
    result = json.loads(out)
    assert result["acquired"] == frames and result["written"] == {"hdf5": frames}
    expected = reference(PIPELINE_SHAPE)
    with h5py.File(result["files"]["hdf5"]) as f:
        main = f["entry/main"]
        assert list(main["index"][:]) == list(range(frames)) and main["valid"][:].all()
        images = main["image"]
        assert images.shape == (frames, *PIPELINE_SHAPE)
        for i in range(frames):
            np.testing.assert_array_equal(images[i], expected.frame(i))


def test_pipeline_writes_a_scan_of_50_camera_frames_completely(camera_pipeline):
    pipeline, _ = camera_pipeline
    scan_of_50_frames_is_written_completely(pipeline)
    master = pipeline.proxy("tic/master/1")
    assert master.DroppedFrames == 0 and master.state() == tango.DevState.ON
    assert json.loads(master.ScanMetadata)["frames"] == 50


def test_camera_stopped_mid_scan_is_reported_the_scan_ends_and_the_restarted_camera_serves(camera_pipeline):
    pipeline, camera = camera_pipeline
    master = pipeline.proxy("tic/master/1")
    master_log = Path(pipeline.state) / "logs" / "PipelineMaster_tic.log"
    master.StartScan(json.dumps({"frames": 5000}))  # minutes at the camera's rate
    cam = pipeline.proxy(CAMERA.name)
    wait_for(  # the camera runs the scan's acquisition (prepareAcq reset last_image_ready)
        lambda: cam.acq_status == "Running" and cam.acq_nb_frames == 5000 and cam.last_image_ready >= 10,
        what="the camera to make 10 frames of the long scan",
    )
    wait_for(lambda: master.ScanFrames >= 10, what="10 frames at the master")
    master_pid = pipeline.session["servers"]["PipelineMaster/tic"]
    camera.stop()
    wait_for(
        lambda: "device_lost" in master_log.read_text(), timeout=60, what="the outage in the master's log"
    )
    assert "tic/camera/1" in master_log.read_text()
    assert master.state() == tango.DevState.RUNNING and master.Acquiring  # waiting, not broken
    acquired = master.EndScan()
    assert 10 <= acquired < 5000
    wait_for(lambda: master.state() == tango.DevState.ON, what="the master idle again")
    assert pid_alive(master_pid)
    camera.start()
    scan_of_50_frames_is_written_completely(pipeline)
    assert "subscribed anew" in master_log.read_text()
