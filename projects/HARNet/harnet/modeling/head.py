"""The HAR-Net head: RetinaNet towers with cross-level group norm, per-level spatial attention,
cross-level SE channel attention and a second predictor pair."""

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from .channel_attention import CrossLevelSE
from .clgn import CrossLevelGroupNorm
from .init import init_head_
from .spatial_attention import SpatialAttention

__all__ = ["HARRetinaNetHead", "SPATIAL_MODES"]

SPATIAL_MODES = ("mul", "residual")

# (logits per level, box deltas per level) of one predictor pair.
Predictions = Tuple[List[Tensor], List[Tensor]]


class HARRetinaNetHead(RetinaNetHead):
    """
    RetinaNet's head with HAR-Net's channel and spatial attention. Per tower (cls, box),
    with levels l = P3..P7 and masks m_l from the FPN outputs P_l:

    - ``f_l = tower(P_l)``: 4 x [conv3x3 -> CLGN -> ReLU], the norm statistics shared by all
      levels (or Detectron2's plain tower when CLGN is off);
    - ``f_l <- f_l * m_l`` (mode "mul") or ``f_l * (1 + m_l)`` (mode "residual"),
      ``m_l = SpatialAttention_l(P_l)``;
    - predictor A: ``cls_score(f_l)``, ``bbox_pred(f_l)``;
    - ``g_l = CrossLevelSE(f_1..f_L)_l``; predictor B: ``channel_cls_score(g_l)``,
      ``channel_bbox_pred(g_l)`` (with a single predictor, ``cls_score``/``bbox_pred`` read g_l).

    ``forward`` returns RetinaNetHead's output (logits and deltas per level), averaged over
    the predictors; :meth:`forward_predictors` returns each predictor's output separately
    (for the per-predictor training losses) and the spatial masks.

    With every option off this is Detectron2's RetinaNetHead: same parameters, same names
    (``cls_subnet.*``, ``bbox_subnet.*``, ``cls_score``, ``bbox_pred``), same outputs. With
    CLGN on, the tower convs keep those names (the norms are ``cls_subnet_norm.*`` and
    ``bbox_subnet_norm.*``), so RetinaNet checkpoints load into the towers.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        norm="",
        prior_prob: float = 0.01,
        clgn_num_groups: int = 0,
        clgn_last_norm_init: float = 0.1,
        spatial_dilations: Optional[Sequence[Sequence[int]]] = None,
        spatial_channels: int = 16,
        spatial_norm_groups: int = 4,
        spatial_mode: str = "mul",
        spatial_shared: bool = False,
        channel_attention: bool = False,
        channel_hidden: int = 32,
        channel_extra_conv: bool = True,
        dual_predictor: bool = True,
        init: str = "detectron2",
    ):
        """
        Args:
            input_shape, num_classes, num_anchors, conv_dims, norm, prior_prob: as
                Detectron2's :class:`RetinaNetHead`; ``norm`` must be "" with CLGN.
            clgn_num_groups (int): groups of the towers' cross-level group norm; 0 = no CLGN.
            clgn_last_norm_init (float): initial CLGN weight of the last tower conv.
            spatial_dilations (list[list[int]] or None): dilations of each level's spatial
                attention branch (one list per level, or one list for all); None = no
                spatial attention.
            spatial_channels, spatial_norm_groups: see :class:`SpatialAttention`.
            spatial_mode (str): "mul" (``x * m``) or "residual" (``x * (1 + m)``).
            spatial_shared (bool): one branch for all levels (needs one dilation list).
            channel_attention (bool): cross-level SE per tower.
            channel_hidden, channel_extra_conv: see :class:`CrossLevelSE`.
            dual_predictor (bool): with channel attention, keep predictor A on the spatially
                attended features and add predictor B on the channel-attended ones.
            init (str): weight initialisation of the towers, predictors and SE extra convs,
                one of :data:`harnet.modeling.init.INIT_SCHEMES` (see :func:`init_head_`).
        """
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            num_anchors=num_anchors,
            conv_dims=conv_dims,
            norm=norm,
            prior_prob=prior_prob,
        )
        num_levels = len(input_shape)
        channels = conv_dims[-1]
        self.num_classes = num_classes
        self.num_anchors = num_anchors

        # --- CLGN towers: Detectron2's tower convs, interleaved with cross-level norms ---
        self.use_clgn = clgn_num_groups > 0
        if self.use_clgn:
            if norm:
                raise ValueError(
                    f"HARRetinaNetHead: norm={norm!r} and CLGN both normalise the towers; "
                    "use one (MODEL.RETINANET.NORM must be '' with MODEL.HARNET.CLGN.ENABLED)"
                )
            self.cls_subnet_norm = self._clgn_list(conv_dims, clgn_num_groups, clgn_last_norm_init)
            self.bbox_subnet_norm = self._clgn_list(conv_dims, clgn_num_groups, clgn_last_norm_init)

        # --- Spatial attention, one branch per level (or one shared) ---
        if spatial_mode not in SPATIAL_MODES:
            raise ValueError(
                f"HARRetinaNetHead: spatial_mode must be one of {SPATIAL_MODES}, "
                f"got {spatial_mode!r}"
            )
        self.spatial_mode = spatial_mode
        self.use_spatial = spatial_dilations is not None
        if self.use_spatial:
            dilations = [tuple(int(d) for d in row) for row in spatial_dilations]
            if len(dilations) == 1:
                dilations = dilations * num_levels
            if len(dilations) != num_levels:
                raise ValueError(
                    f"HARRetinaNetHead: spatial_dilations has {len(dilations)} rows for "
                    f"{num_levels} levels; give one row per level or a single row"
                )
            if spatial_shared and len(set(dilations)) != 1:
                raise ValueError(
                    "HARRetinaNetHead: a shared spatial attention branch needs the same "
                    f"dilations for every level, got {dilations}"
                )
            self.spatial_dilations = dilations
            self.spatial_attention = nn.ModuleList(
                SpatialAttention(input_shape[0].channels, spatial_channels, d, spatial_norm_groups)
                for d in (dilations[:1] if spatial_shared else dilations)
            )

        # --- Channel attention and the second predictor ---
        self.use_channel = bool(channel_attention)
        self.dual_predictor = self.use_channel and bool(dual_predictor)
        if self.use_channel:
            self.cls_channel_attention = CrossLevelSE(
                channels, num_levels, channel_hidden, channel_extra_conv
            )
            self.bbox_channel_attention = CrossLevelSE(
                channels, num_levels, channel_hidden, channel_extra_conv
            )
        if self.dual_predictor:
            self.channel_cls_score = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
            self.channel_bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
            # Same initialisation as predictor A (RetinaNetHead).
            for layer in (self.channel_cls_score, self.channel_bbox_pred):
                nn.init.normal_(layer.weight, mean=0, std=0.01)
                nn.init.constant_(layer.bias, 0)
            nn.init.constant_(self.channel_cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        init_head_(self, init)

    @staticmethod
    def _clgn_list(conv_dims, num_groups, last_norm_init):
        for c in conv_dims:
            if c % num_groups != 0:
                raise ValueError(
                    f"HARRetinaNetHead: clgn_num_groups={num_groups} must divide the tower "
                    f"channels {list(conv_dims)} (MODEL.HARNET.CLGN.NUM_GROUPS vs "
                    "MODEL.FPN.OUT_CHANNELS)"
                )
        norms = nn.ModuleList(CrossLevelGroupNorm(num_groups, c) for c in conv_dims)
        nn.init.constant_(norms[-1].weight, last_norm_init)
        return norms

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        har = cfg.MODEL.HARNET
        ret.update(
            clgn_num_groups=har.CLGN.NUM_GROUPS if har.CLGN.ENABLED else 0,
            clgn_last_norm_init=har.CLGN.LAST_NORM_INIT,
            spatial_dilations=har.SPATIAL.DILATIONS if har.SPATIAL.ENABLED else None,
            spatial_channels=har.SPATIAL.CHANNELS,
            spatial_norm_groups=har.SPATIAL.NORM_GROUPS,
            spatial_mode=har.SPATIAL.MODE,
            spatial_shared=har.SPATIAL.SHARED,
            channel_attention=har.CHANNEL.ENABLED,
            channel_hidden=har.CHANNEL.HIDDEN,
            channel_extra_conv=har.CHANNEL.EXTRA_CONV,
            dual_predictor=har.CHANNEL.DUAL_PREDICTOR,
            init=har.INIT,
        )
        return ret

    @property
    def num_predictors(self) -> int:
        """Number of predictor pairs (2 with the dual predictor, else 1)."""
        return 2 if self.dual_predictor else 1

    def _towers(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """The cls and box towers' outputs, per level."""
        if torch.jit.is_scripting():  # the modules of __prepare_scriptable__
            return self._scripting_cls_tower(features), self._scripting_bbox_tower(features)
        return (
            self._tower(self.cls_subnet, getattr(self, "cls_subnet_norm", None))(features),
            self._tower(self.bbox_subnet, getattr(self, "bbox_subnet_norm", None))(features),
        )

    @staticmethod
    def _tower(subnet: nn.Sequential, norms: Optional[nn.ModuleList]) -> nn.Module:
        if norms is None:
            return PerLevel(subnet)
        return CrossLevelTower([m for m in subnet if isinstance(m, nn.Conv2d)], norms)

    def __prepare_scriptable__(self) -> "HARRetinaNetHead":
        """What ``torch.jit.script`` compiles: a shallow copy holding each tower as one
        module (shared weights; the original's parameter names are untouched). Idempotent:
        a prepared copy returns itself, creating no module (see
        :meth:`HARRetinaNet.__prepare_scriptable__`)."""
        if "_scripting_cls_tower" in self._modules:
            return self
        scripted = copy.copy(self)
        scripted._modules = dict(self._modules)
        scripted._scripting_cls_tower = self._tower(
            self.cls_subnet, getattr(self, "cls_subnet_norm", None)
        )
        scripted._scripting_bbox_tower = self._tower(
            self.bbox_subnet, getattr(self, "bbox_subnet_norm", None)
        )
        return scripted

    def spatial_masks(self, features: List[Tensor]) -> List[Tensor]:
        """
        Args:
            features (list[Tensor[N, C, H_l, W_l]]): the FPN levels.

        Returns:
            list[Tensor[N, 1, H_l, W_l]]: the spatial attention mask of each level, in (0, 1).
        """
        if not self.use_spatial:
            raise RuntimeError(
                "HARRetinaNetHead has no spatial attention (MODEL.HARNET.SPATIAL.ENABLED=False)"
            )
        branches = self.spatial_attention
        if len(branches) == 1:
            return [branches[0](x) for x in features]
        masks: List[Tensor] = []
        for i, branch in enumerate(branches):  # (TorchScript: a loop over the modules)
            masks.append(branch(features[i]))
        return masks

    def _attend(self, x: Tensor, mask: Tensor) -> Tensor:
        return x * mask if self.spatial_mode == "mul" else x * (1 + mask)

    def forward_predictors(self, features: List[Tensor]) -> Dict[str, object]:
        """
        Args:
            features (list[Tensor[N, C, H_l, W_l]]): the FPN levels, high to low resolution.

        Returns:
            dict with
              "predictions": list over predictors (A first) of (logits, deltas): per-level
                  tensors of shape (N, A*K, H_l, W_l) and (N, A*4, H_l, W_l);
              "masks": list[Tensor[N, 1, H_l, W_l]] spatial masks, or None.
        """
        predictions, masks = self._predict(features)
        return {"predictions": predictions, "masks": masks}

    def _predict(self, features: List[Tensor]) -> Tuple[List[Predictions], Optional[List[Tensor]]]:
        if len(features) != self._num_features:
            raise ValueError(
                f"HARRetinaNetHead: got {len(features)} feature levels, built for "
                f"{self._num_features}"
            )
        cls_feats, box_feats = self._towers(features)
        masks: Optional[List[Tensor]] = None
        if self.use_spatial:
            level_masks = self.spatial_masks(features)
            cls_feats = [self._attend(x, m) for x, m in zip(cls_feats, level_masks)]
            box_feats = [self._attend(x, m) for x, m in zip(box_feats, level_masks)]
            masks = level_masks

        predictions: List[Predictions] = []
        if not self.use_channel or self.dual_predictor:
            predictions.append(
                ([self.cls_score(x) for x in cls_feats], [self.bbox_pred(x) for x in box_feats])
            )
        if self.use_channel:
            cls_ch = self.cls_channel_attention(cls_feats)
            box_ch = self.bbox_channel_attention(box_feats)
            # (Two calls rather than a chosen module: TorchScript calls submodules by name.)
            if self.dual_predictor:
                cls_out = [self.channel_cls_score(x) for x in cls_ch]
                box_out = [self.channel_bbox_pred(x) for x in box_ch]
            else:
                cls_out = [self.cls_score(x) for x in cls_ch]
                box_out = [self.bbox_pred(x) for x in box_ch]
            predictions.append((cls_out, box_out))
        return predictions, masks

    @staticmethod
    def average_predictions(predictions: List[Predictions]) -> Predictions:
        """Mean over predictors of the logits and of the deltas, per level."""
        if len(predictions) == 1:
            return predictions[0]
        n = len(predictions)
        logits = list(predictions[0][0])
        deltas = list(predictions[0][1])
        for other in predictions[1:]:  # sum() order: the same floats as before
            logits = [a + b for a, b in zip(logits, other[0])]
            deltas = [a + b for a, b in zip(deltas, other[1])]
        return [x / n for x in logits], [x / n for x in deltas]

    def forward(self, features: List[Tensor]) -> Predictions:
        """
        Args:
            features (list[Tensor[N, C, H_l, W_l]]): the FPN levels, high to low resolution.

        Returns:
            logits (list[Tensor[N, A*K, H_l, W_l]]), bbox_reg (list[Tensor[N, A*4, H_l, W_l]]):
            as :class:`RetinaNetHead`, averaged over the predictor pairs.
        """
        return self.average_predictions(self._predict(features)[0])


class PerLevel(nn.Module):
    """``module`` applied to each level: ``[module(x) for x in features]``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        return [self.module(x) for x in features]


class CrossLevelTower(nn.Module):
    """A CLGN tower: ``f <- relu(CLGN_i([conv_i(f_l) for l]))`` for each (conv_i, CLGN_i);
    each norm needs every level's conv output before any level can go on. Holds (does not
    own) the head's convs and norms."""

    def __init__(self, convs: List[nn.Module], norms: nn.ModuleList):
        super().__init__()
        if len(convs) != len(norms):
            raise ValueError(f"CrossLevelTower: {len(convs)} convs but {len(norms)} norms")
        self.convs = nn.ModuleList(convs)
        self.norms = norms

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        for conv, norm in zip(self.convs, self.norms):
            outputs: List[Tensor] = []
            for x in features:  # (a loop: TorchScript calls a zipped module in no comprehension)
                outputs.append(conv(x))
            features = [F.relu(x) for x in norm(outputs)]
        return features
