"""The FPN layout of the authors' released network (``MODEL.BACKBONE.NAME =
"build_harnet_resnet_authors_fpn_backbone"``)."""

from typing import Dict

from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN

from .backbone import build_harnet_resnet_fpn_backbone

__all__ = ["AuthorsFPN", "build_harnet_resnet_authors_fpn_backbone"]


class AuthorsFPN(FPN):
    """
    Detectron2's :class:`FPN` (same constructor, parameter names and outputs) wired as the
    authors' prototxts wire it (``fpn_pool5`` / ``fpn_upscore_conv*`` / ``fpn_pool4`` /
    ``fpn_pool3`` layers of ``models/coco/ResNet-*/retina_end2end/*hyr_att*.prototxt``):

    - the top level is its 1x1 lateral conv only, ``P5 = lateral5(C5)`` (no 3x3 after it,
      so there is no ``fpn_output5``);
    - the top-down path upsamples (nearest, x2, cropped to the lateral's size) the
      *output* of the level above: ``P4 = output4(lateral4(C4) + up(P5))``,
      ``P3 = output3(lateral3(C3) + up(P4))``; Detectron2 upsamples the pre-3x3 sums;
    - every conv (laterals, outputs, the top block's P6/P7) starts from N(0, 0.01^2) weights
      and zero biases (Detectron2: Caffe2 Xavier fill).

    The top block (P6, P7) is Detectron2's, fed as configured (RetinaNet: from C5).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The lists are in top-down order: index 0 is the coarsest input level.
        top_stage = self._out_features[len(self.in_features) - 1][1:]
        delattr(self, f"fpn_output{top_stage}")
        self.output_convs = [None] + list(self.output_convs[1:])
        convs = list(self.lateral_convs) + list(self.output_convs[1:])
        if self.top_block is not None:
            convs += [m for m in self.top_block.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x (Tensor[N, C, H, W]): the input images.

        Returns:
            dict[str -> Tensor]: "p<stage>" -> feature map, high to low resolution, as
            :meth:`FPN.forward`.
        """
        bottom_up_features = self.bottom_up(x)
        prev = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [prev]
        for idx in range(1, len(self.lateral_convs)):
            lateral = self.lateral_convs[idx](bottom_up_features[self.in_features[-idx - 1]])
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            top_down = top_down[..., : lateral.shape[-2], : lateral.shape[-1]]
            fused = lateral + top_down
            if self._fuse_type == "avg":
                fused = fused / 2
            prev = self.output_convs[idx](fused)
            results.insert(0, prev)
        if self.top_block is not None:
            name = self.top_block.in_feature
            if name in bottom_up_features:
                top_in = bottom_up_features[name]
            else:
                top_in = results[self._out_features.index(name)]
            results.extend(self.top_block(top_in))
        if len(results) != len(self._out_features):
            raise AssertionError(f"AuthorsFPN: {len(results)} outputs for {self._out_features}")
        return dict(zip(self._out_features, results))


@BACKBONE_REGISTRY.register()
def build_harnet_resnet_authors_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    :func:`build_harnet_resnet_fpn_backbone` (ResNet, aligned attention as configured, P6/P7
    from C5) with :class:`AuthorsFPN` in place of Detectron2's FPN.

    Returns:
        AuthorsFPN: outputs p3..p7 (with RetinaNet's MODEL.FPN.IN_FEATURES).
    """
    base = build_harnet_resnet_fpn_backbone(cfg, input_shape)
    return AuthorsFPN(
        bottom_up=base.bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=base.top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
