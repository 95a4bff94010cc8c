"""Spatial attention: a stacked-dilated-conv branch predicting a one-channel sigmoid mask."""

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SpatialAttention"]


class SpatialAttention(nn.Module):
    """
    Spatial attention branch of HAR-Net ("where" to look) for one pyramid level:
    ``m = sigmoid(conv3x3(h_K))``, ``h_k = relu(gn(conv3x3_{dilation d_k}(h_{k-1})))``, ``h_0 = x``;
    the mask ``m`` (N, 1, H, W) re-weights the tower features (``x * m`` or ``x * (1 + m)``,
    applied by the caller). No loss supervises it.

    Args:
        in_channels (int): channels of the input feature map.
        mid_channels (int): channels of the dilated convs (16 in the reference).
        dilations (sequence[int]): one dilated 3x3 conv (padding = dilation, so the
            resolution is kept) per entry; the reference uses (1, 2, 5, 2) on P3-P5 and
            (1, 2, 3, 2) on P6-P7.
        norm_groups (int): groups of the GroupNorm (without affine) after each dilated
            conv; 0 disables it (the reference's older variant).
    """

    def __init__(
        self,
        in_channels: int = 256,
        mid_channels: int = 16,
        dilations: Sequence[int] = (1, 2, 5, 2),
        norm_groups: int = 4,
    ) -> None:
        super().__init__()
        dilations = tuple(int(d) for d in dilations)
        if in_channels <= 0 or mid_channels <= 0:
            raise ValueError(
                f"SpatialAttention: in_channels ({in_channels}) and mid_channels "
                f"({mid_channels}) must be positive"
            )
        if len(dilations) == 0 or any(d <= 0 for d in dilations):
            raise ValueError(
                f"SpatialAttention: dilations must be a non-empty list of positive ints, "
                f"got {dilations}"
            )
        if norm_groups < 0 or (norm_groups > 0 and mid_channels % norm_groups != 0):
            raise ValueError(
                f"SpatialAttention: norm_groups ({norm_groups}) must be 0 (no norm) or divide "
                f"mid_channels ({mid_channels})"
            )
        self.in_channels = in_channels
        self.mid_channels = mid_channels
        self.dilations = dilations
        self.norm_groups = norm_groups

        layers = []
        channels = in_channels
        for d in dilations:
            layers.append(nn.Conv2d(channels, mid_channels, 3, padding=d, dilation=d))
            if norm_groups > 0:
                # No affine: the reference's branch normalises only (no per-channel params).
                layers.append(nn.GroupNorm(norm_groups, mid_channels, affine=False))
            layers.append(nn.ReLU(inplace=True))
            channels = mid_channels
        self.layers = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(mid_channels, 1, 3, padding=1)

        # Same init as RetinaNet's head convs; with zero bias the initial mask is ~0.5.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor[N, in_channels, H, W]): feature map of one level.

        Returns:
            Tensor[N, 1, H, W]: the attention mask, values in (0, 1), dtype of ``x``.
        """
        # Shape checks are skipped while tracing (they would freeze the traced sizes).
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"SpatialAttention: x must have shape (N, {self.in_channels}, H, W), "
                f"got {list(x.shape)}"
            )
        return torch.sigmoid(self.predictor(self.layers(x)))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, mid_channels={self.mid_channels}, "
            f"dilations={self.dilations}, norm_groups={self.norm_groups}"
        )
