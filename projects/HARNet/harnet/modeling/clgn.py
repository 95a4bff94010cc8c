"""Cross-level group norm (CLGN): group norm whose statistics span all pyramid levels."""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossLevelGroupNorm"]


class CrossLevelGroupNorm(nn.Module):
    """
    Group norm over a list of feature maps (pyramid levels) with statistics shared by all
    levels: ``y_l = (x_l - mu[n, g]) / sqrt(var[n, g] + eps) * weight + bias``, where the mean
    ``mu`` and the biased variance ``var`` of image ``n`` and channel group ``g`` are taken
    over the group's channels and the spatial positions of *all* levels together.

    Equivalently: flatten every level to (N, C, H_l * W_l), concatenate along the last axis,
    apply ``nn.GroupNorm`` and split back. The per-channel affine is shared by the levels.
    The signature and attributes mirror ``torch.nn.GroupNorm``; with a single level it is
    exactly ``nn.GroupNorm``.

    Args:
        num_groups (int): number of channel groups; must divide ``num_channels``.
        num_channels (int): number of channels C of every level.
        eps (float): added to the variance for numerical stability.
        affine (bool): if True, learnable per-channel ``weight`` (init 1) and ``bias``
            (init 0), each of shape (C,), shared by all levels.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__()
        if num_groups <= 0:
            raise ValueError(f"CrossLevelGroupNorm: num_groups must be positive, got {num_groups}")
        if num_channels <= 0 or num_channels % num_groups != 0:
            raise ValueError(
                f"CrossLevelGroupNorm: num_channels ({num_channels}) must be a positive "
                f"multiple of num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels))
            self.bias = nn.Parameter(torch.empty(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_inputs(self, features: List[Tensor]) -> None:
        if not isinstance(features, (list, tuple)):
            raise TypeError(
                "CrossLevelGroupNorm: features must be a list of (N, C, H, W) tensors, "
                f"got {type(features).__name__}"
            )
        if len(features) == 0:
            raise ValueError("CrossLevelGroupNorm: features is an empty list")
        if torch.jit.is_tracing():  # shape checks would freeze the traced sizes
            return
        for i, f in enumerate(features):
            if f.dim() < 2:
                raise ValueError(
                    f"CrossLevelGroupNorm: features[{i}] must have shape (N, C, *), "
                    f"got {list(f.shape)}"
                )
            if f.shape[1] != self.num_channels:
                raise ValueError(
                    f"CrossLevelGroupNorm: features[{i}] has {f.shape[1]} channels, "
                    f"expected num_channels={self.num_channels}"
                )
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"CrossLevelGroupNorm: features[{i}] has batch size {f.shape[0]}, "
                    f"but features[0] has {features[0].shape[0]}; all levels must hold the "
                    "same images"
                )

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """
        Args:
            features (list[Tensor[N, C, H_l, W_l]]): one float tensor per level (any number
                of trailing spatial dims, as in ``nn.GroupNorm``).

        Returns:
            list[Tensor[N, C, H_l, W_l]]: the normalised levels, same shapes and dtype.
        """
        self._check_inputs(features)
        flat = [f.flatten(2) for f in features]
        sizes = [f.shape[2] for f in flat]
        # One group_norm call over the concatenation gives the cross-level statistics
        # (a single fused kernel, no python loop over groups).
        out = F.group_norm(
            torch.cat(flat, dim=2), self.num_groups, self.weight, self.bias, self.eps
        )
        return [o.view(f.shape) for o, f in zip(out.split(sizes, dim=2), features)]

    def extra_repr(self) -> str:
        return "{num_groups}, {num_channels}, eps={eps}, affine={affine}".format(**self.__dict__)
