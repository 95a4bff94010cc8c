"""Weight initialisation schemes of the HAR-Net modules (``MODEL.HARNET.INIT``).

"detectron2": the modules' own defaults (Detectron2's RetinaNetHead: N(0, 0.01^2) for the
towers and predictors; Caffe2 MSRA fill inside the aligned blocks, as Detectron2's ResNet).

"authors": the fillers of the authors' released training prototxt
(``models/coco/ResNet-101/retina_end2end/train_hyr_att.prototxt``): "msra" (Caffe's
MSRA filler, N(0, 2 / fan_in), fan_in = C_in * k * k) for the tower convs, both predictor
pairs and the channel attention's extra conv; "gaussian" std 0.01 for the three convs of
each aligned block. Biases keep their values (0, and the focal-loss prior of the cls
predictors); the spatial branches, SE FCs and offset convs are the same in both schemes.
"""

import math

from torch import nn

__all__ = ["INIT_SCHEMES", "caffe_msra_fill_", "init_aligned_attention_", "init_head_"]

INIT_SCHEMES = ("detectron2", "authors")


def caffe_msra_fill_(conv: nn.Conv2d) -> None:
    """Caffe's "msra" filler (variance_norm FAN_IN): weight ~ N(0, 2 / fan_in) with
    ``fan_in = in_channels / groups * kh * kw``; the bias is left as it is."""
    fan_in = conv.weight[0].numel()
    nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))


def init_head_(head, scheme: str) -> None:
    """Initialise a :class:`HARRetinaNetHead`'s tower convs, predictor pairs and channel
    attention extra convs with ``scheme`` (see the module docstring), in place."""
    _check(scheme)
    if scheme == "detectron2":
        return
    convs = [m for m in head.cls_subnet if isinstance(m, nn.Conv2d)]
    convs += [m for m in head.bbox_subnet if isinstance(m, nn.Conv2d)]
    convs += [head.cls_score, head.bbox_pred]
    for name in ("channel_cls_score", "channel_bbox_pred"):
        if hasattr(head, name):
            convs.append(getattr(head, name))
    for name in ("cls_channel_attention", "bbox_channel_attention"):
        se = getattr(head, name, None)
        if se is not None and se.conv is not None:
            convs.append(se.conv)
    for conv in convs:
        caffe_msra_fill_(conv)


def init_aligned_attention_(block, scheme: str) -> None:
    """Initialise an :class:`AlignedAttention` block's conv1 / deformable conv2 / conv3
    with ``scheme``, in place (the zero offset conv and the norms are unchanged)."""
    _check(scheme)
    if scheme == "detectron2":
        return
    for conv in (block.conv1, block.conv2, block.conv3):
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)


def _check(scheme: str) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"MODEL.HARNET.INIT={scheme!r} is unknown; use one of {INIT_SCHEMES}")
