"""LazyConfig twin of har_R_50_FPN_authors.yaml: HAR-Net R-50 (the authors' `hyr_att`
model) with the authors' released recipe. It builds the same model as the yaml (same
parameter names, shapes and outputs), with the same optimizer groups, schedule and data
augmentation (tests/test_authors_recipe.py checks it). See the yaml for the authors' file
behind each setting.

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load("configs/HARNet/har_R_50_FPN_authors.py")
    model = instantiate(cfg.model)
"""

import os

from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling.box_regression import Box2BoxTransform

from harnet import add_harnet_config
from harnet.layers.postprocess import postprocess_params_from_cfg
from harnet.modeling import AuthorsFPN, RoundedAnchorGenerator

_HERE = os.path.dirname(os.path.abspath(__file__))
_base = LazyConfig.load(os.path.join(_HERE, "har_R_50_FPN_1x.py"))
model = _base.model
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
dataloader = _base.dataloader
train = _base.train

# FPN layout and N(0, 0.01^2) init of the authors' prototxts.
model.backbone._target_ = AuthorsFPN

# 6 anchors per location, rounded cell sizes, centres at i*s + s/2 (rpn.cpp).
model.anchor_generator._target_ = RoundedAnchorGenerator
model.anchor_generator.sizes = [[x, x * 2**0.5] for x in [32, 64, 128, 256, 512]]
model.anchor_generator.aspect_ratios = [0.5, 1.0, 2.0]
model.anchor_generator.offset = 0.5
model.head.num_anchors = 6

# Focal loss 0.25 / 2, prior 0.01, smooth-L1 sigma 10 (beta 0.01), no target normalisation.
model.focal_loss_alpha = 0.25
model.focal_loss_gamma = 2.0
model.head.prior_prob = 0.01
model.box_reg_loss_type = "smooth_l1"
model.smooth_l1_beta = 0.01
model.box2box_transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))

# Authors' init; hyr_att spatial attention: no GN, 1-2-5-2 on every level, x * m.
model.head.init = "authors"
model.head.spatial_dilations = [[1, 2, 5, 2]]
model.head.spatial_norm_groups = 0
model.head.spatial_mode = "mul"
for _refiner in model.backbone.bottom_up.refiners:
    _refiner.init = "authors"
    _refiner.last_norm_init = 0.1

# Per-level loss normaliser; candidates clipped and >= 8 original-image pixels.
model.loss_normalizer = "per_level"
model.loss_min_normalizer = 100.0
model.candidate_mode = "authors"
model.candidate_min_size = 8.0
model.test_score_thresh = 0.05
model.test_topk_candidates = 1000
model.test_nms_thresh = 0.5
model.max_detections_per_image = 400

# Post-processing (Gaussian soft-NMS + the authors' box voting): taken from the yaml, so
# the two cannot drift apart.
_yacs = add_harnet_config(get_cfg())
_yacs.merge_from_file(os.path.join(_HERE, "har_R_50_FPN_authors.yaml"))
model.postprocess_params = postprocess_params_from_cfg(_yacs)

# Solver: lr 0.005, 90k iterations, one step at 60k, no warmup; biases 2x lr without
# decay, GN scales with decay (offset convs 0.1x / 0.2x through their lr_factor).
optimizer.lr = 0.005
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0
optimizer.params.weight_decay_norm = 1e-4
optimizer.params.bias_exceptions = "authors"
train.max_iter = 90000
lr_multiplier.scheduler.values = [1.0, 0.1]
lr_multiplier.scheduler.milestones = [60000]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 0.0
lr_multiplier.warmup_factor = 1.0

# Scale jitter x[0.7, 1.0] of short side 800, long side <= 1500; test 800 / 1200.
dataloader.train.total_batch_size = 16
dataloader.train.mapper.augmentations[0].short_edge_length = (560, 800)
dataloader.train.mapper.augmentations[0].sample_style = "range"
dataloader.train.mapper.augmentations[0].max_size = 1500
dataloader.test.mapper.augmentations[0].short_edge_length = 800
dataloader.test.mapper.augmentations[0].max_size = 1200
