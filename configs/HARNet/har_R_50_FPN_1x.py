"""LazyConfig twin of har_R_50_FPN_1x.yaml: Detectron2's model-zoo RetinaNet R-50-FPN 1x
LazyConfig with HAR-Net's full hybrid attention. It builds the same model as the yaml
(same parameter names and shapes; tests/test_configs.py checks it).

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load("configs/HARNet/har_R_50_FPN_1x.py")
    model = instantiate(cfg.model)
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg

from harnet import add_harnet_config
from harnet.layers.postprocess import postprocess_params_from_cfg
from harnet.modeling import AlignedAttention, AlignedResNet, HARRetinaNet, HARRetinaNetHead
from harnet.solver import get_optimizer_params

# Detectron2's RetinaNet R-50-FPN 1x: model, optimizer, 1x schedule, COCO data, train loop.
_retinanet = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
model = _retinanet.model
optimizer = _retinanet.optimizer
lr_multiplier = _retinanet.lr_multiplier
dataloader = _retinanet.dataloader
train = _retinanet.train

model._target_ = HARRetinaNet

# Aligned attention on C4 and C5 (MODEL.HARNET.ALIGN defaults), before the FPN; the FPN's
# LastLevelP6P7 reads "res5", i.e. the refined C5.
_aligned = dict(
    mid_channels=256, deform_groups=4, norm_groups=32, last_norm_init=0.1, offset_lr_factor=0.1
)
model.backbone.bottom_up = L(AlignedResNet)(
    resnet=model.backbone.bottom_up,
    in_features=["res4", "res5"],
    refiners=[
        L(AlignedAttention)(in_channels=1024, **_aligned),
        L(AlignedAttention)(in_channels=2048, **_aligned),
    ],
)

# CLGN towers, per-level spatial attention, cross-level SE and the dual predictor
# (MODEL.HARNET.{CLGN,SPATIAL,CHANNEL} defaults).
model.head._target_ = HARRetinaNetHead
model.head.update(
    clgn_num_groups=32,
    clgn_last_norm_init=0.1,
    spatial_dilations=[[1, 2, 5, 2]] * 3 + [[1, 2, 3, 2]] * 2,
    spatial_channels=16,
    spatial_norm_groups=4,
    spatial_mode="mul",
    spatial_shared=False,
    channel_attention=True,
    channel_hidden=32,
    channel_extra_conv=True,
    dual_predictor=True,
)
model.predictor_loss_weights = [0.5, 0.5]
# Keyword arguments of harnet.layers.postprocess.suppress_detections: the defaults of
# MODEL.HARNET.POSTPROCESS (with Detectron2's NMS_THRESH_TEST 0.5 and 100 detections),
# taken from the yacs defaults so the twin post-processes as the yaml does.
model.postprocess_params = postprocess_params_from_cfg(add_harnet_config(get_cfg()))

# Honour modules' lr_factor (the aligned blocks' offset convs train at 0.1x lr).
optimizer.params._target_ = get_optimizer_params
optimizer.params.base_lr = "${..lr}"
