"""Rendering of the built-in synthetic detection images ("shapes").

One image = a cluttered textured background, non-object distractors, and 1..N objects
of ``CLASS_NAMES`` drawn (anti-aliased polygons) at log-uniform scales, with varied
aspect ratios, rotations, colours and fills, partly overlapping each other.

Box convention (COCO's): the box of an object is the tight box of its **visible** pixels
(after occlusion by later objects/distractors and truncation by the image border), and
``area`` is its visible pixel count. An object is only kept if at least
``min_visible_fraction`` of its pixels stay visible, so every label remains recognisable.

Everything here is a pure function of ``(spec, index)``: ``render_image`` seeds its own
``numpy.random.Generator`` from ``(spec.seed, index)``, so images can be produced in any
order (or in parallel) and are byte-identical across runs (given the same numpy and
OpenCV versions).
"""

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "DEFAULT_CLASS_WEIGHTS", "ShapesSpec", "render_image"]

# Distinguishable by form, not colour (colours are drawn independently of the class).
CLASS_NAMES: Tuple[str, ...] = ("circle", "ellipse", "square", "triangle", "star", "cross")
# Long-tailed class frequencies (head:tail = 8:1), in CLASS_NAMES order.
DEFAULT_CLASS_WEIGHTS: Tuple[float, ...] = (0.40, 0.22, 0.14, 0.11, 0.08, 0.05)

_SUBPIXEL_BITS = 4  # cv2 fixed-point polygon coordinates: 1/16 px precision
_LARGE_FRACTION = 0.4  # objects longer than this x the short image side count as "large"
_MAX_LARGE_PER_IMAGE = 2  # keeps room for the other objects in the image
_PLACEMENT_TRIES = 12


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Everything that determines the generated images and annotations.

    Attributes:
        seed (int >= 0): random seed; image ``i`` uses the generator seeded by ``(seed, i)``.
        num_images (int >= 1): number of images.
        image_size (min, max): each image's height and width are drawn independently and
            uniformly from this inclusive range (equal values give fixed square images).
        object_size (min, max): longer side, in px, of an object's full (unoccluded) box,
            drawn log-uniformly from this range ...
        max_object_fraction (float): ... and capped at this fraction of the image's
            shorter side.
        objects_per_image (min, max): number of objects attempted per image (uniform).
            Placements that would hide too much of an object are dropped, at least one
            object is always kept.
        distractors_per_image (min, max): non-object clutter (irregular blobs, scribbles).
        class_weights: relative class frequencies, one per ``CLASS_NAMES`` entry.
        min_visible_fraction (float in (0, 1]): least visible fraction of any object.
        occlusion_prob (float in [0, 1]): probability that an object is placed on top of
            an existing one (overlapping boxes) instead of at a uniform random position.
        image_format: "jpg" (quality 95) or "png".
    """

    seed: int = 0
    num_images: int = 1000
    image_size: Tuple[int, int] = (384, 384)
    object_size: Tuple[float, float] = (8.0, 300.0)
    max_object_fraction: float = 0.8
    objects_per_image: Tuple[int, int] = (2, 12)
    distractors_per_image: Tuple[int, int] = (2, 8)
    class_weights: Tuple[float, ...] = DEFAULT_CLASS_WEIGHTS
    min_visible_fraction: float = 0.4
    occlusion_prob: float = 0.4
    image_format: str = "jpg"

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        def int_range(name, lo_min):
            value = getattr(self, name)
            try:
                lo, hi = (int(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"ShapesSpec.{name} must be a (min, max) pair, got {value!r}")
            if not lo_min <= lo <= hi:
                raise ValueError(
                    f"ShapesSpec.{name} must satisfy {lo_min} <= min <= max, got {value!r}"
                )
            fix(name, (lo, hi))

        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"ShapesSpec.seed must be a non-negative integer, got {self.seed!r}")
        if int(self.num_images) != self.num_images or self.num_images < 1:
            raise ValueError(
                f"ShapesSpec.num_images must be a positive integer, got {self.num_images!r}"
            )
        fix("seed", int(self.seed))
        fix("num_images", int(self.num_images))
        int_range("image_size", 32)
        int_range("objects_per_image", 1)
        int_range("distractors_per_image", 0)
        try:
            lo, hi = (float(v) for v in self.object_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"ShapesSpec.object_size must be a (min, max) pair, got {self.object_size!r}"
            )
        if not 4.0 <= lo <= hi:
            raise ValueError(
                f"ShapesSpec.object_size must satisfy 4 <= min <= max, got {self.object_size!r}"
            )
        fix("object_size", (lo, hi))
        if not 0.0 < self.max_object_fraction <= 1.0:
            raise ValueError(
                f"ShapesSpec.max_object_fraction must be in (0, 1], "
                f"got {self.max_object_fraction!r}"
            )
        if lo > self.max_object_fraction * self.image_size[0]:
            raise ValueError(
                f"ShapesSpec.object_size min {lo} exceeds max_object_fraction * smallest image "
                f"side = {self.max_object_fraction * self.image_size[0]}"
            )
        weights = tuple(float(w) for w in self.class_weights)
        if len(weights) != len(CLASS_NAMES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"ShapesSpec.class_weights needs {len(CLASS_NAMES)} non-negative weights "
                f"(for {CLASS_NAMES}) with a positive sum, got {self.class_weights!r}"
            )
        fix("class_weights", weights)
        if not 0.0 < self.min_visible_fraction <= 1.0:
            raise ValueError(
                f"ShapesSpec.min_visible_fraction must be in (0, 1], "
                f"got {self.min_visible_fraction!r}"
            )
        if not 0.0 <= self.occlusion_prob <= 1.0:
            raise ValueError(
                f"ShapesSpec.occlusion_prob must be in [0, 1], got {self.occlusion_prob!r}"
            )
        fmt = str(self.image_format).lower().lstrip(".")
        fmt = "jpg" if fmt == "jpeg" else fmt
        if fmt not in ("jpg", "png"):
            raise ValueError(
                f"ShapesSpec.image_format must be 'jpg' or 'png', got {self.image_format!r}"
            )
        fix("image_format", fmt)

    def to_dict(self) -> Dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------- shapes
def _unit_polygon(cls_name: str, rng: np.random.Generator) -> Tuple[np.ndarray, float, float]:
    """A class's outline around the origin, plus (aspect stretch, rotation in radians)."""
    if cls_name == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1), 1.0, 0.0
    if cls_name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        # axis ratio >= 1.6 keeps ellipses apart from circles
        return np.stack([np.cos(t), np.sin(t)], 1), rng.uniform(1.6, 3.5), rng.uniform(0, np.pi)
    if cls_name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        return pts, 1.0, rng.uniform(0, np.pi / 2)
    if cls_name == "triangle":
        t = np.deg2rad([90.0, 210.0, 330.0])
        pts = np.stack([np.cos(t), np.sin(t)], 1)
        return pts, math.exp(rng.uniform(math.log(0.6), math.log(1.8))), rng.uniform(0, 2 * np.pi)
    if cls_name == "star":
        inner = rng.uniform(0.38, 0.5)
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
        return pts, math.exp(rng.uniform(math.log(0.8), math.log(1.25))), rng.uniform(0, 2 * np.pi)
    if cls_name == "cross":
        a = rng.uniform(0.18, 0.3)
        pts = np.array(
            [
                [a, 1],
                [a, a],
                [1, a],
                [1, -a],
                [a, -a],
                [a, -1],
                [-a, -1],
                [-a, -a],
                [-1, -a],
                [-1, a],
                [-a, a],
                [-a, 1],
            ],
            dtype=np.float64,
        )
        stretch = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        return pts, stretch, rng.uniform(-np.pi / 9, np.pi / 9)
    raise KeyError(cls_name)


def _blob_polygon(rng: np.random.Generator) -> Tuple[np.ndarray, float, float]:
    """Irregular star-convex blob (distractor): radius = 1 + strong random harmonics 2..5."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 6):
        radius += rng.uniform(0.08, 0.3) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    radius = np.maximum(radius, 0.25)
    pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    return pts, math.exp(rng.uniform(math.log(0.5), math.log(2.0))), rng.uniform(0, 2 * np.pi)


def _rasterize(pts: np.ndarray, stretch: float, angle: float, size: float) -> np.ndarray:
    """Anti-aliased coverage (float32 in [0, 1]) of the polygon scaled so that the longer
    side of its box is ``size`` px; the patch has a 1 px margin."""
    pts = pts * np.array([math.sqrt(stretch), 1.0 / math.sqrt(stretch)])
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    pts = pts - pts.min(0)
    pts = pts * (size / max(pts.max(), 1e-6)) + 1.0
    h, w = (int(math.ceil(v)) + 2 for v in pts.max(0)[::-1])
    patch = np.zeros((h, w), np.uint8)
    fixed = np.round(pts * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(patch, [fixed], 255, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
    return patch.astype(np.float32) / 255.0


# ---------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour field + noise or grating texture (float32 HxWx3, 0..255)."""
    gh, gw = rng.integers(2, 7, size=2)
    grid = rng.uniform(0, 255, size=(gh, gw, 3)).astype(np.float32)
    # partly desaturated so that backgrounds are cluttered but objects stay legible
    gray = grid.mean(2, keepdims=True)
    grid = gray + (grid - gray) * np.float32(rng.uniform(0.3, 1.0))
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    kind = rng.integers(3)
    if kind in (0, 2):  # band-limited noise
        k = int(rng.choice([2, 4, 8]))
        noise = rng.standard_normal(size=((h + k - 1) // k, (w + k - 1) // k), dtype=np.float32)
        noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
        img += (noise * np.float32(rng.uniform(8, 30)))[..., None]
    if kind in (1, 2):  # oriented grating
        period, theta = rng.uniform(5, 40), rng.uniform(0, np.pi)
        k = np.float32(2 * np.pi / period)
        xs = np.arange(w, dtype=np.float32) * (k * np.float32(math.cos(theta)))
        ys = np.arange(h, dtype=np.float32)[:, None] * (k * np.float32(math.sin(theta)))
        img += (np.sin(xs + ys) * np.float32(rng.uniform(10, 35)))[..., None]
    return img


def _mean_color(region: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    if mask is None:
        return np.array(cv2.mean(region)[:3])
    return np.array(cv2.mean(region, mask.view(np.uint8))[:3])


def _random_color(
    rng: np.random.Generator, avoid: np.ndarray, min_dist: float = 100.0
) -> np.ndarray:
    """A colour at least ``min_dist`` (RGB L2) from ``avoid`` when one is found quickly."""
    for _ in range(10):
        color = rng.uniform(0, 255, size=3)
        if np.linalg.norm(color - avoid) >= min_dist:
            return color
    return 255.0 - avoid


def _fill(rng: np.random.Generator, color: np.ndarray, h: int, w: int) -> np.ndarray:
    """Object appearance (float32 hxwx3): flat, linear gradient or noisy fill."""
    style = rng.choice(3, p=[0.5, 0.3, 0.2])
    if style == 0:
        return np.broadcast_to(color.astype(np.float32), (h, w, 3))
    if style == 1:
        phi = rng.uniform(0, 2 * np.pi)
        t = np.arange(w, dtype=np.float32) * np.float32(math.cos(phi)) + np.arange(
            h, dtype=np.float32
        )[:, None] * np.float32(math.sin(phi))
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        return color.astype(np.float32) * (1.0 - rng.uniform(0.2, 0.5) * t)[..., None]
    noise = rng.standard_normal(size=(h, w, 1), dtype=np.float32) * np.float32(12.0)
    return color.astype(np.float32) + noise


def _clip_region(x0: int, y0: int, ph: int, pw: int, h: int, w: int):
    """Image slice and patch slice of a patch at (x0, y0), or None if fully outside."""
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + pw, w), min(y0 + ph, h)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    img_sl = (slice(iy0, iy1), slice(ix0, ix1))
    patch_sl = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    return img_sl, patch_sl


def _blend(canvas: np.ndarray, img_sl, appearance: np.ndarray, alpha: np.ndarray) -> None:
    region = canvas[img_sl]
    region += (appearance - region) * alpha[..., None]


def _draw_scribbles(rng: np.random.Generator, canvas: np.ndarray, count: int) -> None:
    h, w = canvas.shape[:2]
    for _ in range(count):
        n = int(rng.integers(2, 6))
        pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], 1)
        fixed = np.round(pts * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.polylines(
            canvas, [fixed], False, color, int(rng.integers(1, 4)), cv2.LINE_AA, _SUBPIXEL_BITS
        )


class _Occupancy:
    """Per-pixel owner map (-1: background) and each object's visible pixel count, so a
    placement can be refused if it would leave any object less than ``min_visible``."""

    def __init__(self, h: int, w: int, min_visible: float):
        self.owner = np.full((h, w), -1, np.int32)
        self.visible: List[int] = []
        self.total: List[int] = []
        self.regions: List[Tuple[slice, slice]] = []
        self.min_visible = min_visible

    def try_place(self, alpha: np.ndarray, x0: int, y0: int, is_object: bool):
        """Claims the pixels (coverage >= 0.5) of the patch if every constraint holds.
        Returns the (image, patch) slices on success, None otherwise."""
        h, w = self.owner.shape
        region = _clip_region(x0, y0, alpha.shape[0], alpha.shape[1], h, w)
        if region is None:
            return None
        img_sl, patch_sl = region
        full = alpha >= 0.5
        inside = full[patch_sl]
        total, n_inside = int(full.sum()), int(inside.sum())
        if is_object and (total < 4 or n_inside < self.min_visible * total):
            return None
        under = self.owner[img_sl][inside]
        hidden = np.bincount(under[under >= 0], minlength=len(self.visible))
        for j in np.nonzero(hidden)[0]:
            if self.visible[j] - hidden[j] < self.min_visible * self.total[j]:
                return None
        for j in np.nonzero(hidden)[0]:
            self.visible[j] -= int(hidden[j])
        owner = self.owner[img_sl]
        owner[inside] = len(self.visible) if is_object else -1
        if is_object:
            self.visible.append(n_inside)
            self.total.append(total)
            self.regions.append(img_sl)
        return region

    def visible_box(self, k: int) -> Tuple[int, int, int, int]:
        """Tight COCO box [x, y, w, h] (pixel grid) of object k's visible pixels."""
        img_sl = self.regions[k]
        ys, xs = np.nonzero(self.owner[img_sl] == k)
        x, y = int(xs.min()) + img_sl[1].start, int(ys.min()) + img_sl[0].start
        return x, y, int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


def _object_sizes(
    rng: np.random.Generator, spec: ShapesSpec, n: int, short_side: int
) -> List[float]:
    lo = spec.object_size[0]
    hi = max(lo, min(spec.object_size[1], spec.max_object_fraction * short_side))
    sizes = [_log_uniform(rng, lo, hi) for _ in range(n)]
    large = _LARGE_FRACTION * short_side
    n_large = 0
    for i, s in enumerate(sizes):
        if s > large:
            n_large += 1
            if n_large > _MAX_LARGE_PER_IMAGE:
                sizes[i] = _log_uniform(rng, lo, max(lo, large))
    return sizes


def render_image(spec: ShapesSpec, index: int) -> Tuple[np.ndarray, List[Dict]]:
    """Renders image ``index`` of the dataset described by ``spec``.

    Returns:
        image (np.ndarray uint8, HxWx3, BGR as cv2 writes it), and its annotations: a list
        of dicts with "category_id" (1-based index into CLASS_NAMES), "bbox" [x, y, w, h]
        (int, visible pixels), "area" (float, visible pixel count) and "visible_fraction".
    """
    rng = np.random.default_rng([spec.seed, index])
    h, w = (int(v) for v in rng.integers(spec.image_size[0], spec.image_size[1] + 1, size=2))
    short = min(h, w)
    canvas = _background(rng, h, w)
    n_clutter = int(rng.integers(spec.distractors_per_image[0], spec.distractors_per_image[1] + 1))
    n_scribbles = int(rng.binomial(n_clutter, 0.35))
    _draw_scribbles(rng, canvas, n_scribbles)
    occ = _Occupancy(h, w, spec.min_visible_fraction)
    blob_hi = max(
        spec.object_size[0], 0.5 * min(spec.object_size[1], spec.max_object_fraction * short)
    )
    for _ in range(n_clutter - n_scribbles):
        alpha = _rasterize(*_blob_polygon(rng), _log_uniform(rng, spec.object_size[0], blob_hi))
        x0 = int(rng.integers(-alpha.shape[1] // 2, w - alpha.shape[1] // 2))
        y0 = int(rng.integers(-alpha.shape[0] // 2, h - alpha.shape[0] // 2))
        region = _clip_region(x0, y0, alpha.shape[0], alpha.shape[1], h, w)
        if region is not None:
            color = _random_color(rng, _mean_color(canvas[region[0]]), 40.0)
            a = alpha[region[1]]
            _blend(canvas, region[0], _fill(rng, color, *a.shape), a)

    probs = np.asarray(spec.class_weights) / sum(spec.class_weights)
    n_obj = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
    classes = rng.choice(len(CLASS_NAMES), size=n_obj, p=probs)
    sizes = _object_sizes(rng, spec, n_obj, short)
    # Mostly back-to-front by size (large objects behind), with jitter so that similar
    # sizes occlude each other both ways.
    order = np.argsort(-(np.log(sizes) + rng.normal(0, 0.7, size=n_obj)), kind="stable")
    placed_cls: List[int] = []
    for i in order:
        alpha = _rasterize(*_unit_polygon(CLASS_NAMES[classes[i]], rng), sizes[i])
        ph, pw = alpha.shape
        for _ in range(_PLACEMENT_TRIES):
            if occ.visible and rng.uniform() < spec.occlusion_prob:
                # overlap an existing object: centre within 0.6x the half-sum of extents
                j = int(rng.integers(len(occ.visible)))
                ys, xs = occ.regions[j]
                cx = 0.5 * (xs.start + xs.stop) + rng.uniform(-0.6, 0.6) * 0.5 * (
                    xs.stop - xs.start + pw
                )
                cy = 0.5 * (ys.start + ys.stop) + rng.uniform(-0.6, 0.6) * 0.5 * (
                    ys.stop - ys.start + ph
                )
            else:  # up to ~25% of the object may fall outside the image
                cx = rng.uniform(0.25 * pw, max(w - 0.25 * pw, 0.25 * pw + 1))
                cy = rng.uniform(0.25 * ph, max(h - 0.25 * ph, 0.25 * ph + 1))
            x0, y0 = int(round(cx - pw / 2)), int(round(cy - ph / 2))
            region = occ.try_place(alpha, x0, y0, is_object=True)
            if region is not None:
                break
        else:
            continue
        img_sl, patch_sl = region
        a = alpha[patch_sl]
        color = _random_color(rng, _mean_color(canvas[img_sl], a >= 0.5))
        _blend(canvas, img_sl, _fill(rng, color, *a.shape), a)
        placed_cls.append(int(classes[i]))
    if not placed_cls:  # cannot happen with the validated spec, but never emit an empty image
        raise RuntimeError(f"shapes: no object could be placed in image {index} of {spec}")

    # Occasional distractor in front of objects: clutter also occludes.
    if n_clutter and rng.uniform() < 0.3:
        alpha = _rasterize(*_blob_polygon(rng), _log_uniform(rng, spec.object_size[0], blob_hi))
        x0, y0 = (
            int(rng.integers(0, w)) - alpha.shape[1] // 2,
            int(rng.integers(0, h)) - alpha.shape[0] // 2,
        )
        region = occ.try_place(alpha, x0, y0, is_object=False)
        if region is not None:
            color = _random_color(rng, _mean_color(canvas[region[0]]), 40.0)
            a = alpha[region[1]]
            _blend(canvas, region[0], _fill(rng, color, *a.shape), a)

    np.clip(canvas, 0.0, 255.0, out=canvas)
    image = (canvas + 0.5).astype(np.uint8)
    annotations = []
    for k, cls in enumerate(placed_cls):
        annotations.append(
            {
                "category_id": cls + 1,
                "bbox": list(occ.visible_box(k)),
                "area": float(occ.visible[k]),
                "visible_fraction": round(occ.visible[k] / occ.total[k], 4),
            }
        )
    return image, annotations
