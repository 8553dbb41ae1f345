"""Maps over the scan grid: positions (raster and snake), assembling scalars, the map_position step."""

import numpy as np
import pytest

from pipelines.steps import StepChain, StepConfigError, load_step
from pipelines.steps.maps import MapAssembler, ScanMaps, grid_position


def test_raster_and_snake_positions():
    assert [grid_position(i, [3, 4]) for i in (0, 3, 4, 7, 11)] == [(0, 0), (0, 3), (1, 0), (1, 3), (2, 3)]
    assert [grid_position(i, [3, 4], snake=True) for i in (0, 3, 4, 7, 8, 11)] == [
        (0, 0),
        (0, 3),
        (1, 3),
        (1, 0),
        (2, 0),
        (2, 3),
    ]
    assert grid_position(5, [10]) == (0, 5)
    with pytest.raises(IndexError, match="point index 12 is outside a 3 x 4 scan"):
        grid_position(12, [3, 4])
    with pytest.raises(ValueError, match="scan_shape = \\[3, 0\\]"):
        grid_position(0, [3, 0])


def test_snake_map_of_a_motor_position_is_a_clean_ramp():
    """A snake scan records the fast motor going back and forth; the map must show it increasing."""
    n_slow, n_fast = 5, 7
    assembler = MapAssembler([n_slow, n_fast], snake=True)
    order = np.random.default_rng(16).permutation(n_slow * n_fast)  # results arrive in any order
    for index in order:
        row = index // n_fast
        step_in_row = index % n_fast
        motor_x = step_in_row if row % 2 == 0 else n_fast - 1 - step_in_row
        assembler.add(int(index), float(motor_x))
    assert assembler.complete
    np.testing.assert_array_equal(assembler.map, np.tile(np.arange(n_fast, dtype=float), (n_slow, 1)))


def test_unmeasured_points_are_nan_and_counted_once():
    assembler = MapAssembler([2, 3])
    assembler.add(4, 1.5)
    assembler.add(4, 2.5)  # a re-sent point replaces its value
    assert assembler.filled == 1 and not assembler.complete
    assert np.isnan(assembler.map).sum() == 5 and assembler.map[1, 1] == 2.5


def test_scan_maps_collects_numeric_scalars():
    maps = ScanMaps([2, 2])
    for index in range(4):
        maps.add(index, {"Fe": index * 10, "hit": True, "label": "x", "com_row": 1.0 + index})
    assert sorted(maps.maps) == ["Fe", "com_row"]
    np.testing.assert_array_equal(maps["Fe"], [[0, 10], [20, 30]])
    only = ScanMaps([2, 2], names=["com_row"])
    only.add(0, {"Fe": 1, "com_row": 2})
    assert list(only.maps) == ["com_row"]


def test_map_position_step_in_a_chain():
    chain = StepChain([{"map_position": {"snake": True}}, "centre_of_mass"])
    out = chain(np.ones((4, 4)), {"scan": 1, "index": 5, "scan_shape": [3, 4]})
    assert (out["map_row"], out["map_col"]) == (1, 2)
    step = load_step("map_position")
    assert step(None, {"index": 5, "scan_shape": [3, 4], "snake": True}) == {"map_row": 1, "map_col": 2}
    with pytest.raises(ValueError, match="meta has no scan_shape"):
        step(None, {"index": 0})
    with pytest.raises(StepConfigError, match="snake"):
        load_step({"map_position": {"snake": "yes"}})
