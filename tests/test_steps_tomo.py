"""Tomography: sinogram assembly and the FBP preview (numba back-projector vs numpy) on a disk phantom."""

import numpy as np
import pytest

from pipelines.steps import StepConfigError, load_step
from pipelines.steps.tomo import (
    SinogramAssembler,
    backproject_kernel,
    backproject_reference,
    fbp,
    fbp_reference,
)

SIZE = 128
# disks: (row, col) offsets from the centre, radius, attenuation per pixel
DISKS = [((0.0, 0.0), 50.0, 0.02), ((-15.0, 10.0), 12.0, 0.03), ((20.0, -18.0), 8.0, -0.01)]


def phantom(size=SIZE):
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size] - c
    image = np.zeros((size, size))
    for (dy, dx), radius, value in DISKS:
        image[(x - dx) ** 2 + (y - dy) ** 2 <= radius**2] += value
    return image


def analytic_sinogram(angles_deg, n_det=SIZE, centre=None):
    """Exact line integrals of the disks, in the geometry fbp documents."""
    centre = (n_det - 1) / 2 if centre is None else centre
    t = np.arange(n_det) - centre
    sinogram = np.zeros((len(angles_deg), n_det))
    for k, angle in enumerate(np.radians(angles_deg)):
        for (dy, dx), radius, value in DISKS:
            s = t - (dx * np.cos(angle) + dy * np.sin(angle))
            sinogram[k] += 2 * value * np.sqrt(np.clip(radius**2 - s**2, 0, None))
    return sinogram


def test_backprojector_matches_numpy():
    rng = np.random.default_rng(17)
    filtered = rng.normal(size=(90, 101))
    angles = np.sort(rng.uniform(0, 180, 90))
    radians = np.radians(angles)
    for centre, size in [(50.0, 101), (47.3, 64)]:
        out = np.empty((size, size))
        backproject_kernel(filtered, np.cos(radians), np.sin(radians), centre, out)
        np.testing.assert_allclose(
            out, backproject_reference(filtered, angles, centre, size), rtol=1e-9, atol=1e-9
        )


def test_fbp_reconstructs_the_phantom():
    angles = np.linspace(0, 180, 180, endpoint=False)
    sinogram = analytic_sinogram(angles)
    image = fbp(sinogram, angles)
    reference = fbp_reference(sinogram, angles)
    np.testing.assert_allclose(image, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())
    truth = phantom()
    c = (SIZE - 1) / 2
    y, x = np.mgrid[0:SIZE, 0:SIZE] - c
    inner = (x - 10) ** 2 + (y + 15) ** 2 <= 8**2  # well inside the small bright disk
    assert image[inner].mean() == pytest.approx(0.05, rel=0.05)
    body = (
        ((x**2 + y**2) <= 40**2)
        & ((x - 10) ** 2 + (y + 15) ** 2 > 14**2)
        & ((x + 18) ** 2 + (y - 20) ** 2 > 10**2)
    )
    assert image[body].mean() == pytest.approx(0.02, rel=0.05)
    assert np.corrcoef(image.ravel(), truth.ravel())[0, 1] > 0.95


def test_off_centre_rotation_axis():
    angles = np.linspace(0, 180, 120, endpoint=False)
    sinogram = analytic_sinogram(angles, n_det=140, centre=72.5)
    image = fbp(sinogram, angles, centre=72.5, size=SIZE)
    assert np.corrcoef(image.ravel(), phantom().ravel())[0, 1] > 0.95
    wrong = fbp(sinogram, angles, size=SIZE)  # the default centre (69.5) is 3 pixels off
    assert np.corrcoef(wrong.ravel(), phantom().ravel())[0, 1] < 0.9


def test_sinogram_rows_step_and_assembler_build_the_slice():
    """Projections arrive in any order; the assembler sorts by angle and reconstructs the chosen rows."""
    angles = np.linspace(0, 180, 90, endpoint=False)
    sinogram = analytic_sinogram(angles)
    transmission = np.exp(-sinogram)  # what a flat-field-corrected detector row sees
    step = load_step({"sinogram_rows": {"rows": [3, 7], "log": True}})
    assembler = SinogramAssembler(rows=[7])
    for k in np.random.default_rng(18).permutation(len(angles)):
        projection = np.tile(transmission[k], (10, 1)).astype(np.float32)
        out = step(projection, {"angle": float(angles[k])})
        assert set(out) == {"angle", "sino_3", "sino_7"}
        assembler.add_results(out)
    assert assembler.rows() == [7]
    got_angles, got = assembler.sinogram(7)
    np.testing.assert_allclose(got_angles, angles)
    np.testing.assert_allclose(got, sinogram, atol=1e-5)
    image = assembler.reconstruct(7)
    assert np.corrcoef(image.ravel(), phantom().ravel())[0, 1] > 0.95
    whole = SinogramAssembler()
    whole.add(np.arange(6.0).reshape(2, 3), angle=10.0)
    assert whole.rows() == [0, 1] and whole.sinogram(1)[1].tolist() == [[3.0, 4.0, 5.0]]
    with pytest.raises(KeyError, match="no projection rows for slice 5"):
        whole.sinogram(5)


def test_errors():
    step = load_step({"sinogram_rows": {"rows": [12]}})
    with pytest.raises(ValueError, match="meta has no angle"):
        step(np.zeros((10, 10)), {})
    with pytest.raises(ValueError, match="row 12 is not a row"):
        step(np.zeros((10, 10)), {"angle": 0.0})
    with pytest.raises(StepConfigError, match="missing required parameter.*rows"):
        load_step("sinogram_rows")
    with pytest.raises(ValueError, match="needs one angle per row"):
        fbp(np.zeros((5, 8)), [0, 1])
