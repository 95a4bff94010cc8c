"""Anchors with the authors' quantised cell sizes (``MODEL.ANCHOR_GENERATOR.NAME =
"RoundedAnchorGenerator"``)."""

import math
from typing import Sequence

import torch

from detectron2.config import configurable
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    DefaultAnchorGenerator,
    _broadcast_params,
)

__all__ = ["RoundedAnchorGenerator", "rounded_cell_anchors"]


def _round_half_away(x: float) -> float:
    # C++ std::round (the authors' rpn.cpp), not Python's round-half-to-even.
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


def rounded_cell_anchors(
    stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]
) -> torch.Tensor:
    """
    Cell anchors of one level as the authors' ``rpn.cpp`` builds them, in Detectron2's
    continuous coordinates, centred on (0, 0).

    From a ``stride x stride`` base box, each aspect ratio ``a`` (height / width) gets
    ``w0 = round(sqrt(stride^2 / a))``, ``h0 = round(a * w0)``; each scale
    ``s = size / stride`` then gives a ``(s * w0) x (s * h0)`` anchor. (Detectron2's
    :class:`DefaultAnchorGenerator` uses the exact ``sqrt(size^2 / a)`` instead.)

    Args:
        stride (int): the level's stride.
        sizes (list[float]): anchor sizes (sqrt of the nominal area), e.g. [32, 45.25].
        aspect_ratios (list[float]): height / width ratios.

    Returns:
        Tensor[len(sizes) * len(aspect_ratios), 4]: XYXY boxes, float32, size-major order
        (as Detectron2's cell anchors, so heads see the same anchor layout).
    """
    if stride <= 0 or any(s <= 0 for s in sizes) or any(a <= 0 for a in aspect_ratios):
        raise ValueError(
            f"rounded_cell_anchors: stride {stride}, sizes {list(sizes)} and aspect ratios "
            f"{list(aspect_ratios)} must be positive"
        )
    anchors = []
    for size in sizes:
        scale = size / stride
        for a in aspect_ratios:
            w0 = _round_half_away(math.sqrt(stride * stride / a))
            h0 = _round_half_away(a * w0)
            w, h = w0 * scale, h0 * scale
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


@ANCHOR_GENERATOR_REGISTRY.register()
class RoundedAnchorGenerator(DefaultAnchorGenerator):
    """
    Detectron2's :class:`DefaultAnchorGenerator` (same config keys, same grid:
    ``MODEL.ANCHOR_GENERATOR.OFFSET``) with the cell anchors of
    :func:`rounded_cell_anchors`.

    With ``OFFSET = 0.5`` the anchor centres are those of the authors' code: their base
    anchor is ``(0, 0, s-1, s-1)`` in inclusive pixel indices, whose centre in their box
    coder (``x1 + 0.5 * (x2 - x1 + 1)``) is ``i*s + s/2`` in continuous coordinates.
    """

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset=0.5):
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)
        sizes = _broadcast_params(sizes, len(strides), "sizes")
        ratios = _broadcast_params(aspect_ratios, len(strides), "aspect_ratios")
        # Replace the exact cell anchors (same buffers' names and shapes, same count).
        for buf, stride, s, a in zip(list(self.cell_anchors), strides, sizes, ratios):
            cell = rounded_cell_anchors(stride, s, a)
            if buf.shape != cell.shape:
                raise AssertionError(f"cell anchors {tuple(cell.shape)} vs {tuple(buf.shape)}")
            buf.copy_(cell)
