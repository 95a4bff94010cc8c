"""ResNet-FPN backbone of HAR-Net: Detectron2's RetinaNet backbone with aligned attention
on chosen bottom-up outputs (C4, C5) before the FPN."""

from typing import Dict, List, Sequence

from torch import Tensor, nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.backbone.fpn import build_retinanet_resnet_fpn_backbone

from .aligned_attention import AlignedAttention
from .config_keys import ALIGN_KEYS, naming_config_keys

__all__ = ["AlignedResNet", "build_harnet_resnet_fpn_backbone"]


class AlignedResNet(ResNet):
    """
    A Detectron2 :class:`ResNet` whose outputs ``in_features`` are refined by the given
    modules before they leave the backbone: ``outputs[f] = refiner_f(outputs[f])``.

    The refinement is a side branch, as in the reference's released network: a refined
    C4 feeds the FPN, while res5 is still computed from the unrefined C4. The ResNet's
    stem and stages are adopted as they are (weights, frozen state), so parameter names
    are unchanged (``stem.*``, ``res2.*``, ...) and ResNet / RetinaNet checkpoints load;
    the refiners live under ``aligned_attention.<feature>.*``.

    Args:
        resnet (ResNet): a built Detectron2 ResNet without classifier (``num_classes=None``).
        in_features (list[str]): outputs of ``resnet`` to refine, e.g. ``["res4", "res5"]``.
        refiners (list[nn.Module]): one module per entry of ``in_features``, each mapping a
            (N, C, H, W) tensor to a tensor of the same shape (e.g. :class:`AlignedAttention`).
    """

    def __init__(self, resnet: ResNet, in_features: Sequence[str], refiners: Sequence[nn.Module]):
        if not isinstance(resnet, ResNet):
            raise TypeError(
                f"AlignedResNet: resnet must be a detectron2 ResNet, got {type(resnet)}"
            )
        if resnet.num_classes is not None:
            raise ValueError("AlignedResNet: resnet must have no classifier (num_classes=None)")
        in_features = list(in_features)
        refiners = list(refiners)
        unknown = [f for f in in_features if f not in resnet._out_features]
        if unknown:
            raise ValueError(
                f"AlignedResNet: in_features {unknown} are not outputs of the ResNet "
                f"(its out_features: {list(resnet._out_features)})"
            )
        if len(set(in_features)) != len(in_features):
            raise ValueError(f"AlignedResNet: in_features has duplicates: {in_features}")
        if len(in_features) != len(refiners):
            raise ValueError(
                f"AlignedResNet: got {len(in_features)} in_features {in_features} but "
                f"{len(refiners)} refiners"
            )
        stages = [list(getattr(resnet, name)) for name in resnet.stage_names]
        # freeze_at=0: the adopted blocks keep the frozen state `resnet` gave them.
        super().__init__(resnet.stem, stages, out_features=list(resnet._out_features))
        self.aligned_attention = nn.ModuleDict(dict(zip(in_features, refiners)))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x (Tensor[N, C, H, W]): the input images.

        Returns:
            dict[str -> Tensor]: the ResNet's outputs, with ``in_features`` refined.
        """
        # ResNet.forward's walk over the stem and stages, written out rather than called
        # through super(): TorchScript compiles no super() call, and scripting the detector
        # (detectron2.export.scripting_with_instances) compiles this method.
        outputs: Dict[str, Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        for name, refiner in self.aligned_attention.items():
            outputs[name] = refiner(outputs[name])
        return outputs


def aligned_attention_from_config(cfg, bottom_up_shapes) -> List[nn.Module]:
    """The :class:`AlignedAttention` blocks of ``cfg.MODEL.HARNET.ALIGN``, one per
    IN_FEATURES entry that is a bottom-up output (dict name -> ShapeSpec); the others are
    left to :class:`AlignedResNet`'s check."""
    align = cfg.MODEL.HARNET.ALIGN
    in_features = [f for f in align.IN_FEATURES if f in bottom_up_shapes]
    mid = list(align.MID_CHANNELS)
    mid = mid * len(in_features) if len(mid) == 1 else mid
    return [
        AlignedAttention(
            bottom_up_shapes[name].channels,
            mid_channels=mid_channels,
            deform_groups=align.DEFORM_GROUPS,
            norm_groups=align.NORM_GROUPS,
            last_norm_init=align.LAST_NORM_INIT,
            offset_lr_factor=align.OFFSET_LR_FACTOR,
            init=cfg.MODEL.HARNET.INIT,
        )
        for name, mid_channels in zip(in_features, mid)
    ]


@BACKBONE_REGISTRY.register()
def build_harnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    Detectron2's ``build_retinanet_resnet_fpn_backbone`` (ResNet, FPN, P6/P7 from C5 by
    ``LastLevelP6P7``) whose ResNet outputs ``MODEL.HARNET.ALIGN.IN_FEATURES`` are refined by
    :class:`AlignedAttention` when ``MODEL.HARNET.ALIGN.ENABLED``; P6 is then computed from
    the refined C5. With ALIGN disabled it returns Detectron2's backbone unchanged.

    Returns:
        FPN: a Detectron2 FPN backbone (outputs p3..p7).
    """
    backbone = build_retinanet_resnet_fpn_backbone(cfg, input_shape)
    if not cfg.MODEL.HARNET.ALIGN.ENABLED:
        return backbone
    resnet = backbone.bottom_up
    with naming_config_keys(ALIGN_KEYS):
        blocks = aligned_attention_from_config(cfg, resnet.output_shape())
        # The FPN only reads the bottom-up's output shapes at construction, and refinement
        # keeps them, so swapping in the refined ResNet keeps the FPN valid and its names.
        backbone.bottom_up = AlignedResNet(resnet, cfg.MODEL.HARNET.ALIGN.IN_FEATURES, blocks)
    return backbone
