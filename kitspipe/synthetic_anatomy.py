"""Anatomy of the synthetic abdominal CT: one patient drawn in millimetres and Hounsfield units.

Everything here lives in the *patient frame*: millimetres with x towards the patient's left,
y towards the back and z towards the head (the LPS orientation), with its origin on the
midline, halfway between the two kidney centres. Sizes are drawn once per patient, so the
same patient can be scanned on a fine or a coarse grid; :mod:`kitspipe.synthetic` paints it.

Organs are described by implicit shapes (superellipses, ellipsoids) rather than voxels; a
:class:`Scan` places a voxel grid in the patient frame and hands out patient coordinates for
any window of it. Intensities follow a late-arterial-phase contrast CT, as in KiTS19:
enhancing renal cortex, darker medulla, bright aorta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

KIDNEY = 1
TUMOUR = 2
AIR_HU = -1000.0
FAT_HU = -95.0
# Tumour intensities are clipped to this window; it overlaps the renal medulla on purpose,
# so that intensity alone cannot separate tumour from kidney.
TUMOUR_HU_RANGE = (20.0, 110.0)
TUMOUR_RADIUS_RANGE = (5.0, 40.0)
# Share of patients with 0, 1, 2 or 3 tumours: about 78 % have at least one, as in KiTS19.
TUMOUR_COUNT_PROBABILITIES = (0.22, 0.60, 0.12, 0.06)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with semi-axes along the columns of ``axes`` (a rotation matrix)."""

    centre: np.ndarray
    semi_axes: np.ndarray
    axes: np.ndarray

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """Coordinates along the ellipsoid's own axes of the broadcast points (x, y, z)."""
        d = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        return tuple(self.axes[0, k] * d[0] + self.axes[1, k] * d[1] + self.axes[2, k] * d[2]
                     for k in range(3))

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised radius: below 1 inside, 1 on the surface."""
        u, v, w = self.local(x, y, z)
        a = self.semi_axes
        return np.sqrt((u / a[0]) ** 2 + (v / a[1]) ** 2 + (w / a[2]) ** 2)

    def half_extent(self) -> np.ndarray:
        """Half-size of the axis-aligned box that holds the ellipsoid."""
        return np.sqrt(((self.axes * self.semi_axes) ** 2).sum(axis=1))


@dataclass(frozen=True)
class Kidney:
    """A bean-shaped kidney: an ellipsoid bent towards its hilum, with a notch at the hilum.

    Local axes of ``shape``: 0 runs along the long axis towards the upper pole, 1 points to
    the hilum (medially and forwards), 2 completes the frame.
    """

    side: str
    shape: Ellipsoid
    bend: float
    cortex_mm: float
    fat_mm: float
    column_count: int
    column_phase: float


@dataclass(frozen=True)
class Tumour:
    """A roughly ellipsoidal renal mass, centred near the surface of one kidney."""

    kidney: int
    radius_mm: float
    shape: Ellipsoid
    base_hu: float
    texture_hu: float
    lobulation: float
    necrotic_core: float
    necrosis_hu: float


@dataclass(frozen=True)
class Anatomy:
    """One synthetic patient: body outline, organs and tissue intensities."""

    body_half_width: float
    body_front: float
    body_back: float
    body_exponent: float
    body_wobble: float
    body_wobble_phase: float
    fat_mm: float
    muscle_mm: float
    spine_y: float
    vertebra_half_width: float
    vertebra_half_depth: float
    vertebra_period: float
    vertebra_phase: float
    aorta: tuple[float, float, float]
    ivc: tuple[float, float, float]
    liver: Ellipsoid
    spleen: Ellipsoid
    kidneys: tuple[Kidney, Kidney]
    tumours: tuple[Tumour, ...]
    hu: dict[str, float]

    def z_range_of_interest(self, margin_mm: float = 10.0) -> tuple[float, float]:
        """Lowest and highest z (mm) reached by kidneys and tumours, widened by a margin."""
        shapes = [k.shape for k in self.kidneys] + [t.shape for t in self.tumours]
        low = min(s.centre[2] - s.half_extent()[2] for s in shapes)
        high = max(s.centre[2] + s.half_extent()[2] for s in shapes)
        return low - margin_mm, high + margin_mm


def _frame(long_axis: np.ndarray, towards: np.ndarray) -> np.ndarray:
    """Rotation whose first column is ``long_axis`` and second lies towards ``towards``."""
    u = long_axis / np.linalg.norm(long_axis)
    v = towards - (towards @ u) * u
    v /= np.linalg.norm(v)
    return np.column_stack([u, v, np.cross(u, v)])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _sample_kidney(rng: np.random.Generator, side: str, centre: np.ndarray) -> Kidney:
    medial = 1.0 if side == "right" else -1.0
    # The upper pole leans medially and backwards; the hilum faces medially and forwards.
    tilt_medial, tilt_back = np.radians(rng.uniform(8, 18)), np.radians(rng.uniform(5, 15))
    hilum_turn = np.radians(rng.uniform(20, 40))
    axes = _frame(np.array([medial * np.tan(tilt_medial), np.tan(tilt_back), 1.0]),
                  np.array([medial * np.cos(hilum_turn), -np.sin(hilum_turn), 0.0]))
    semi_axes = np.array([rng.uniform(50, 60), rng.uniform(25, 30), rng.uniform(20, 25)])
    return Kidney(side=side, shape=Ellipsoid(centre, semi_axes, axes),
                  bend=rng.uniform(0.15, 0.3), cortex_mm=rng.uniform(5, 8),
                  fat_mm=rng.uniform(6, 14), column_count=int(rng.integers(6, 10)),
                  column_phase=rng.uniform(0, 2 * np.pi))


def sample_tumour_radius(rng: np.random.Generator) -> float:
    """Tumour radius (mm): log-normal with a 15 mm median, kept within 5-40 mm.

    Small masses are the most common, as among KiTS19 tumours; a few reach 40 mm.

    Args:
        rng: the patient's random generator.
    """
    return float(np.clip(15.0 * np.exp(0.55 * rng.standard_normal()), *TUMOUR_RADIUS_RANGE))


def _sample_tumour(rng: np.random.Generator, kidneys: tuple[Kidney, Kidney], index: int) -> Tumour:
    kidney = kidneys[index]
    shape = kidney.shape
    radius = sample_tumour_radius(rng)
    # A random surface direction, kept away from the hilum and from the very poles so that
    # the mass grows out of the parenchyma and stays inside the scanned slab.
    while True:
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        if direction[1] < 0.5 and abs(direction[0]) < 0.8:
            break
    a = shape.semi_axes
    surface = direction / np.sqrt(((direction / a) ** 2).sum())
    surface[1] += kidney.bend * a[1] * (surface[0] / a[0]) ** 2
    normal = surface / a**2
    normal /= np.linalg.norm(normal)
    offset = radius * rng.uniform(-0.5, 0.4)
    centre = shape.centre + shape.axes @ (surface + offset * normal)
    semi_axes = radius * rng.uniform(0.85, 1.15, size=3)
    big = radius > 20.0
    return Tumour(kidney=index, radius_mm=radius,
                  shape=Ellipsoid(centre, semi_axes, _random_rotation(rng)),
                  base_hu=rng.uniform(45, 90), texture_hu=rng.uniform(8, 18),
                  lobulation=rng.uniform(0.03, 0.1),
                  necrotic_core=rng.uniform(0.4, 0.65) if big else 0.0,
                  necrosis_hu=rng.uniform(20, 35))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy; everything in millimetres and Hounsfield units.

    Args:
        rng: the patient's random generator; the result depends on nothing else.
    """
    half_width, front, back = rng.uniform(150, 185), rng.uniform(110, 135), rng.uniform(95, 115)
    fat, muscle = rng.uniform(10, 30), rng.uniform(8, 14)
    spine_y = back - fat - rng.uniform(65, 80)
    cavity_width, cavity_front = half_width - fat - muscle, front - fat - muscle
    vertebra_w, vertebra_d = rng.uniform(20, 24), rng.uniform(15, 18)

    dz = rng.uniform(5, 20)  # the liver pushes the right kidney down
    kidneys = tuple(
        _sample_kidney(rng, side, np.array([sign * rng.uniform(60, 75),
                                            spine_y + rng.uniform(-5, 10), sign * dz / 2]))
        for side, sign in (("right", -1.0), ("left", 1.0)))
    count = int(rng.choice(len(TUMOUR_COUNT_PROBABILITIES), p=TUMOUR_COUNT_PROBABILITIES))
    first = int(rng.integers(2))
    # Further tumours mostly grow in the same kidney; bilateral disease is the exception.
    sides = [first if i == 0 or rng.random() < 0.7 else 1 - first for i in range(count)]
    tumours = tuple(_sample_tumour(rng, kidneys, side) for side in sides)

    liver = Ellipsoid(
        np.array([-rng.uniform(0.45, 0.55) * cavity_width, -rng.uniform(0.0, 0.15) * cavity_front,
                  rng.uniform(80, 105)]),
        np.array([rng.uniform(85, 100), rng.uniform(70, 85), rng.uniform(75, 90)]),
        _frame(np.array([0.0, 0.0, 1.0]), np.array([1.0, rng.uniform(-0.2, 0.2), 0.0])))
    spleen_turn = np.radians(rng.uniform(20, 40))
    spleen = Ellipsoid(
        np.array([rng.uniform(0.55, 0.65) * cavity_width, rng.uniform(0.2, 0.35) * back,
                  rng.uniform(60, 90)]),
        np.array([rng.uniform(55, 70), rng.uniform(30, 40), rng.uniform(45, 55)]),
        _frame(np.array([0.0, 0.0, 1.0]),
               np.array([np.cos(spleen_turn), np.sin(spleen_turn), 0.0])))
    aorta_r = rng.uniform(10, 13)
    hu = {
        "fat": FAT_HU + rng.uniform(-10, 10), "muscle": rng.uniform(40, 55),
        "bowel": rng.uniform(15, 30), "liver": rng.uniform(55, 70), "spleen": rng.uniform(45, 60),
        "bone": rng.uniform(350, 450), "cortical_bone": rng.uniform(800, 1000),
        "disc": rng.uniform(70, 100), "aorta": rng.uniform(200, 280), "ivc": rng.uniform(90, 130),
        "cortex": rng.uniform(160, 190), "medulla": rng.uniform(105, 125),
        "sinus": rng.uniform(-70, -40), "pelvis": rng.uniform(10, 25),
    }
    return Anatomy(
        body_half_width=half_width, body_front=front, body_back=back,
        body_exponent=rng.uniform(2.2, 2.6), body_wobble=rng.uniform(0.02, 0.05),
        body_wobble_phase=rng.uniform(0, 2 * np.pi), fat_mm=fat, muscle_mm=muscle,
        spine_y=spine_y, vertebra_half_width=vertebra_w, vertebra_half_depth=vertebra_d,
        vertebra_period=rng.uniform(30, 34), vertebra_phase=rng.uniform(0, 34),
        aorta=(rng.uniform(12, 18), spine_y - vertebra_d - aorta_r - rng.uniform(2, 5), aorta_r),
        ivc=(-rng.uniform(20, 26), spine_y - vertebra_d - rng.uniform(10, 14), rng.uniform(9, 12)),
        liver=liver, spleen=spleen, kidneys=kidneys, tumours=tumours, hu=hu)


@dataclass(frozen=True)
class Scan:
    """Where the voxel grid lies in the patient frame, and how the scanner degrades it.

    Voxel (s, r, c) sits at patient x = x0 + c * pixel_mm, y = y0 + r * pixel_mm,
    z = z0 - s * slice_mm: slices run from head to feet, rows from front to back and columns
    from the patient's right to left, as in KiTS19.
    """

    shape: tuple[int, int, int]
    pixel_mm: float
    slice_mm: float
    origin: tuple[float, float, float]
    noise_hu: float
    blur_voxels: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.slice_mm, self.pixel_mm, self.pixel_mm)

    def to_world(self, point: np.ndarray) -> np.ndarray:
        """LPS world position (as SimpleITK sees the written file) of a patient-frame point."""
        return np.asarray(point, dtype=float) - np.asarray(self.origin)

    def axes(self, centre: np.ndarray | None = None, half: np.ndarray | None = None):
        """Index window of the patient box ``centre +- half`` (whole grid if None).

        Returns the window (a tuple of slices) and the patient x, y, z of its voxels as
        float32 arrays that broadcast to the window's shape.
        """
        x0, y0, z0 = self.origin
        # Per index axis (slice, row, col): first coordinate, step, patient axis.
        lines = ((z0, -self.slice_mm, 2), (y0, self.pixel_mm, 1), (x0, self.pixel_mm, 0))
        ranges = []
        for (start, step, k), n in zip(lines, self.shape):
            if centre is None:
                ranges.append((0, n))
                continue
            ends = sorted(((centre[k] - half[k] - start) / step,
                           (centre[k] + half[k] - start) / step))
            low = min(n, max(0, int(np.floor(ends[0]))))
            ranges.append((low, max(low, min(n, int(np.ceil(ends[1])) + 1))))
        z, y, x = (np.float32(start) + np.float32(step) * np.arange(a, b, dtype=np.float32)
                   for (start, step, _), (a, b) in zip(lines, ranges))
        window = tuple(slice(a, b) for a, b in ranges)
        return window, x[None, None, :], y[None, :, None], z[:, None, None]


def _upsample_linearly(field: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``field`` along ``axis`` to ``n_out`` samples, same extent."""
    n_in = field.shape[axis]
    position = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    weight = np.expand_dims((position - low).astype(np.float32), [a for a in range(3) if a != axis])
    below = np.take(field, low, axis=axis)
    return below + weight * (np.take(field, high, axis=axis) - below)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                 spacing: tuple[float, float, float], correlation_mm: float) -> np.ndarray:
    """Unit-variance random field that varies over about ``correlation_mm``.

    White noise on a lattice twice as fine as the correlation length is smoothed there and
    then linearly interpolated one axis at a time, far cheaper than filtering or spline-zooming
    a full-resolution volume (and free of BLAS threads, which thrash on a busy machine).

    Args:
        rng: random generator to draw the lattice from.
        shape: output shape in voxels (three axes).
        spacing: voxel size (mm) along each axis of ``shape``.
        correlation_mm: length over which the field changes.
    """
    lattice_shape = tuple(max(2, int(np.ceil(2 * n * s / correlation_mm)) + 1)
                          for n, s in zip(shape, spacing))
    field = ndimage.gaussian_filter(rng.standard_normal(lattice_shape).astype(np.float32), 1.0)
    field /= field.std() + 1e-6
    # Widen the cheap axes first, so the costly last pass runs over the fewest voxels.
    for axis in (2, 1, 0):
        field = _upsample_linearly(field, shape[axis], axis)
    return field
