"""Aligned attention: a deformable-conv residual bottleneck that refines a backbone output."""

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d, deform_conv2d

from .init import init_aligned_attention_

__all__ = ["AlignedAttention"]


class AlignedAttention(nn.Module):
    """
    Aligned attention block of HAR-Net, put on backbone outputs (C4, C5) before the FPN:
    ``y = x + relu(gn(conv1x1(relu(gn(deform3x3(a, offsets(a)))))))``, ``a = relu(gn(conv1x1(x)))``,
    where ``deform3x3`` is a DCNv1 conv (``torchvision.ops.deform_conv2d``, no modulation mask)
    and ``offsets`` a plain 3x3 conv, zero-initialised so the block starts on a regular grid.

    The offset conv (``conv2_offset``) carries ``lr_factor = offset_lr_factor``: an optimizer
    built by ``harnet.solver.build_optimizer`` scales its learning rate by it. The last GN's
    weight starts at ``last_norm_init`` so the block starts near the identity.

    Args:
        in_channels (int): channels of ``x`` (and of the output), e.g. 1024 for C4, 2048 for C5.
        mid_channels (int): bottleneck channels (256 in the reference; 512 in one C5 variant).
        deform_groups (int): offset groups of the deformable conv; must divide mid_channels.
        norm_groups (int): GroupNorm groups after each conv; must divide mid_channels and
            in_channels.
        last_norm_init (float): initial weight of the last GroupNorm.
        offset_lr_factor (float): ``lr_factor`` of the offset conv.
        init (str): "detectron2" (Caffe2 MSRA fill of conv1/conv2/conv3) or "authors"
            (N(0, 0.01^2), the authors' prototxt fillers); see :mod:`harnet.modeling.init`.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int = 256,
        deform_groups: int = 4,
        norm_groups: int = 32,
        last_norm_init: float = 0.1,
        offset_lr_factor: float = 0.1,
        init: str = "detectron2",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("mid_channels", mid_channels),
            ("deform_groups", deform_groups),
            ("norm_groups", norm_groups),
        ):
            if value <= 0:
                raise ValueError(f"AlignedAttention: {name} must be positive, got {value}")
        if mid_channels % deform_groups != 0:
            raise ValueError(
                f"AlignedAttention: deform_groups ({deform_groups}) must divide mid_channels "
                f"({mid_channels})"
            )
        for name, value in (("mid_channels", mid_channels), ("in_channels", in_channels)):
            if value % norm_groups != 0:
                raise ValueError(
                    f"AlignedAttention: norm_groups ({norm_groups}) must divide {name} ({value})"
                )
        self.in_channels = in_channels
        self.mid_channels = mid_channels
        self.deform_groups = deform_groups
        self.norm_groups = norm_groups

        # Convs are bias-free: each is followed by a GroupNorm with its own shift.
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.norm1 = nn.GroupNorm(norm_groups, mid_channels)
        self.conv2_offset = nn.Conv2d(mid_channels, 2 * deform_groups * 3 * 3, 3, padding=1)
        self.conv2_offset.lr_factor = float(offset_lr_factor)
        # torchvision infers the offset groups from the offset tensor's channels.
        self.conv2 = DeformConv2d(mid_channels, mid_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups, mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, in_channels, 1, bias=False)
        self.norm3 = nn.GroupNorm(norm_groups, in_channels)

        # MSRA fill as Detectron2's ResNet blocks (incl. its DeformBottleneckBlock) do.
        for conv in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(conv)
        nn.init.zeros_(self.conv2_offset.weight)
        nn.init.zeros_(self.conv2_offset.bias)
        nn.init.constant_(self.norm3.weight, last_norm_init)
        # "authors": N(0, 0.01^2) for conv1/conv2/conv3 (harnet.modeling.init).
        init_aligned_attention_(self, init)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor[N, in_channels, H, W]): a backbone output.

        Returns:
            Tensor[N, in_channels, H, W]: the refined feature map.
        """
        # Shape checks are Python control flow: skipped while tracing (the traced graph is
        # fixed; the sizes would be frozen as constants with a TracerWarning).
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"AlignedAttention: x must have shape (N, {self.in_channels}, H, W), "
                f"got {list(x.shape)}"
            )
        a = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self._deform(a, self._safe_offsets(self.conv2_offset(a)))))
        out = F.relu(self.norm3(self.conv3(out)))
        return x + out

    def _deform(self, a: Tensor, offset: Tensor) -> Tensor:
        # torchvision's deform_conv2d has no CPU kernel for float16/bfloat16, and casts to
        # float32 under CUDA autocast only: run it in float32 for reduced-precision inputs
        # on every device and return the input's dtype, as CUDA autocast does.
        c = self.conv2
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        if a.dtype == offset.dtype and a.dtype == c.weight.dtype and a.dtype == dtype:
            return c(a, offset)
        return self._deform_reduced_precision(a, offset, dtype)

    @torch.jit.unused  # (TorchScript has no autocast context: scripted models run float32)
    def _deform_reduced_precision(self, a: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
        c = self.conv2
        with torch.autocast(a.device.type, enabled=False):
            out = deform_conv2d(a.to(dtype), offset.to(dtype), c.weight.to(dtype), stride=c.stride,
                                padding=c.padding, dilation=c.dilation)  # fmt: skip
        return out.to(a.dtype)

    @staticmethod
    def _safe_offsets(offset: Tensor) -> Tensor:
        # torchvision's CPU kernel turns sampling positions into integer indices; NaN/inf
        # or astronomically large offsets (a diverged model) make that undefined and
        # crash the process. Any offset beyond the map's extent samples only zero
        # padding, so clamping there changes neither the output nor the gradient, and
        # mapping NaN to 0 lets the NaN features propagate to a non-finite loss that the
        # trainer reports with its iteration.
        offset = torch.nan_to_num(offset, nan=0.0)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # the map size stays
            # a traced (or symbolic) value: any input size
            extent = offset.shape[-2] + offset.shape[-1] + 8
            limit = extent * torch.ones_like(offset[:1, :1, :1, :1])
            return torch.minimum(torch.maximum(offset, -limit), limit)
        limit = float(offset.shape[-2] + offset.shape[-1] + 8)
        return offset.clamp(-limit, limit)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, mid_channels={self.mid_channels}, "
            f"deform_groups={self.deform_groups}, norm_groups={self.norm_groups}, "
            f"offset_lr_factor={self.conv2_offset.lr_factor}"
        )
