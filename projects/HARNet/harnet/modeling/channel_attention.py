"""Channel attention: squeeze-and-excitation whose squeeze spans all pyramid levels."""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossLevelSE"]


class CrossLevelSE(nn.Module):
    """
    Cross-level squeeze-and-excitation of HAR-Net ("what" to look at):
    ``g_l = relu(conv3x3(f_l))`` (or ``g_l = f_l`` without the extra conv),
    ``w = sigmoid(fc2(relu(fc1(concat_l(gap(g_l))))))``, output ``g_l * w`` for every level:
    one channel-weight vector per image, shared by all levels.

    Args:
        channels (int): channels C of every level.
        num_levels (int): number of levels L; ``fc1`` takes the L * C pooled values, so
            ``forward`` needs exactly L levels, in a fixed order.
        hidden (int): width of the bottleneck FC (32 in the reference).
        extra_conv (bool): apply the 3x3 conv + ReLU (shared across levels) before the
            squeeze; False applies SE directly to the inputs (the reference's
            channel-only ablation).
    """

    def __init__(
        self, channels: int = 256, num_levels: int = 5, hidden: int = 32, extra_conv: bool = True
    ) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("num_levels", num_levels), ("hidden", hidden)):
            if value <= 0:
                raise ValueError(f"CrossLevelSE: {name} must be positive, got {value}")
        self.channels = channels
        self.num_levels = num_levels
        self.hidden = hidden
        self.extra_conv = extra_conv

        self.conv: Optional[nn.Conv2d] = (
            nn.Conv2d(channels, channels, 3, padding=1) if extra_conv else None
        )
        self.fc1 = nn.Linear(num_levels * channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

        if self.conv is not None:
            # Like the tower convs of RetinaNet's head it sits in.
            nn.init.normal_(self.conv.weight, std=0.01)
            nn.init.constant_(self.conv.bias, 0)
        for fc in (self.fc1, self.fc2):
            # Small weights: w starts near 0.5 for every channel instead of a random pattern.
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.constant_(fc.bias, 0)

    def _check_inputs(self, features: List[Tensor]) -> None:
        if not isinstance(features, (list, tuple)):
            raise TypeError(
                "CrossLevelSE: features must be a list of (N, C, H, W) tensors, "
                f"got {type(features).__name__}"
            )
        if len(features) != self.num_levels:
            raise ValueError(
                f"CrossLevelSE: features has {len(features)} levels, expected "
                f"num_levels={self.num_levels}"
            )
        n = features[0].shape[0]
        for i, f in enumerate(features):
            if torch.jit.is_tracing():  # shape checks would freeze the traced sizes
                break
            if f.dim() != 4 or f.shape[1] != self.channels or f.shape[0] != n:
                raise ValueError(
                    f"CrossLevelSE: features[{i}] must have shape ({n}, {self.channels}, H, W), "
                    f"got {list(f.shape)}"
                )

    def _transform(self, features: List[Tensor]) -> List[Tensor]:
        if self.conv is None:
            return list(features)
        return [F.relu(self.conv(f)) for f in features]

    def _weights(self, g: List[Tensor]) -> Tensor:
        pooled = torch.cat([x.mean(dim=(2, 3)) for x in g], dim=1)  # (N, L*C), level-major
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))

    def channel_weights(self, features: List[Tensor]) -> Tensor:
        """
        Args:
            features (list[Tensor[N, C, H_l, W_l]]): the L levels.

        Returns:
            Tensor[N, C]: the channel weights ``w`` in (0, 1) applied to every level.
        """
        self._check_inputs(features)
        return self._weights(self._transform(features))

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """
        Args:
            features (list[Tensor[N, C, H_l, W_l]]): the L levels, in the order fixed at
                training time (fc1 sees their pooled values in that order).

        Returns:
            list[Tensor[N, C, H_l, W_l]]: ``g_l * w`` per level.
        """
        self._check_inputs(features)
        g = self._transform(features)
        w = self._weights(g)[:, :, None, None]
        return [x * w for x in g]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_levels={self.num_levels}, hidden={self.hidden}, "
            f"extra_conv={self.extra_conv}"
        )
