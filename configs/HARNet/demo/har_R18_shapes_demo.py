"""LazyConfig twin of har_R18_shapes_demo.yaml (the CPU demo): the same model, data,
schedule and optimizer, for ``train_net.py --config-file <this> key=value ...``.

It starts from the R-50 LazyConfig (../har_R_50_FPN_1x.py) and applies the demo's
changes; see the yaml for why each one is made.
"""
import torch
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from harnet.data import register_shapes
from harnet.data.mapper import HARNetDatasetMapper
from harnet.solver import get_optimizer_params

from ..har_R_50_FPN_1x import dataloader, model, train

# --- data: the built-in shapes dataset at the demo's size (same as DATASETS.SHAPES in
# the yaml); registering replaces the default-sized "harnet_shapes_*" of `import harnet`.
_shapes = dict(image_size=(128, 160), object_size=(8.0, 120.0), objects_per_image=(2, 8),
               distractors_per_image=(1, 4))
register_shapes("harnet_shapes_train", seed=0, num_images=800, **_shapes)
register_shapes("harnet_shapes_val", seed=1, num_images=100, **_shapes)

dataloader.train.dataset.names = "harnet_shapes_train"
dataloader.train.mapper._target_ = HARNetDatasetMapper
dataloader.train.mapper.num_classes = 6
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=160),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.use_instance_mask = False
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "harnet_shapes_val"
dataloader.test.mapper._target_ = HARNetDatasetMapper
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=128, max_size=160),
]
dataloader.test.num_workers = 1

# --- model: ResNet-18 with BatchNorm from scratch, 64-channel FPN and towers.
_resnet = model.backbone.bottom_up.resnet
_resnet.stem.norm = "BN"
_resnet.stages.depth = 18
_resnet.stages.norm = "BN"
del _resnet.stages.stride_in_1x1  # BasicBlock has no such option
_resnet.freeze_at = 0
_aligned = dict(mid_channels=64, norm_groups=16)
model.backbone.bottom_up.refiners[0].update(in_channels=256, **_aligned)
model.backbone.bottom_up.refiners[1].update(in_channels=512, **_aligned)
model.backbone.out_channels = 64
model.backbone.top_block.in_channels = 512
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.head.num_anchors = 6
model.head.clgn_num_groups = 16
model.head.clgn_last_norm_init = 1.0  # as the yaml (its comment says why)
model.head.channel_hidden = 16
model.num_classes = 6
model.anchor_generator.sizes = [[12, 17], [24, 34], [48, 68], [96, 136], [192, 271]]
model.smooth_l1_beta = 0.1
model.pixel_std = [57.375, 57.120, 58.395]

# --- schedule: as SOLVER in the yaml (AdamW on HARNet's parameter groups; the yaml's
# gradient clipping has no LazyConfig counterpart in Detectron2's training loop).
optimizer = L(torch.optim.AdamW)(
    params=L(get_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0),
    lr=0.001,
    weight_decay=0.0001,
    fused=True,  # one kernel for all tensors (as build_optimizer does for the yaml)
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[1700, 2090, 2200]),
    warmup_length=200 / 2200,
    warmup_method="linear",
    warmup_factor=0.01,
)
train.max_iter = 2200
train.init_checkpoint = ""
# train.device: inherited ("cuda"); build_config falls back to the CPU without CUDA.
train.output_dir = "./output/demo_lazy"
train.checkpointer.period = 300
train.eval_period = 0
train.log_period = 20
train.seed = 0
