"""HARNet's additions to Detectron2's config: ``add_harnet_config(cfg)``.

Every key is documented where it is added. The sections are kept in separate
functions, one per concern (model, post-processing, test-time augmentation, data).
"""
from detectron2.config import CfgNode as CN


def add_harnet_config(cfg):
    """Add ``cfg.MODEL.HARNET`` and HARNet's other keys to a Detectron2 config, in place.

    Defaults give the full hybrid model of the paper (the paper, Sec. 3, as the authors' py-HAR code builds it).
    """
    cfg.MODEL.HARNET = CN()
    _add_model_config(cfg)
    _add_postprocess_config(cfg)
    _add_tta_config(cfg)
    _add_data_config(cfg)
    _add_train_config(cfg)
    return cfg


def _add_model_config(cfg):
    """Model: aligned, CLGN, spatial and channel attention switches and their settings.

    Used with ``MODEL.META_ARCHITECTURE = "HARRetinaNet"`` and
    ``MODEL.BACKBONE.NAME = "build_harnet_resnet_fpn_backbone"``; every other model key
    (anchors, focal loss, towers' NUM_CONVS, test thresholds) is Detectron2's own
    ``MODEL.RETINANET.*``. With the four ENABLED switches False the model is exactly
    Detectron2's RetinaNet. Values are checked when the model is built (``config_checks``
    for what only the config sees, each module for its arguments, the builders adding the
    key to a module's error), with errors naming the key.
    """
    # --- Aligned attention (py-HAR's aligned-attention blocks): deformable bottleneck on backbone outputs ---
    cfg.MODEL.HARNET.ALIGN = CN()
    # Refine the configured ResNet outputs before the FPN (P6 then comes from refined C5).
    cfg.MODEL.HARNET.ALIGN.ENABLED = True
    # Backbone outputs to refine; each must be in MODEL.RESNETS.OUT_FEATURES.
    cfg.MODEL.HARNET.ALIGN.IN_FEATURES = ["res4", "res5"]
    # Bottleneck width per entry of IN_FEATURES, or a single value for all of them
    # (py-HAR: 256; one variant uses 512 for C5).
    cfg.MODEL.HARNET.ALIGN.MID_CHANNELS = [256]
    # Offset groups of the DCNv1 3x3 conv (py-HAR: 4, i.e. 2*4*9 = 72 offset channels).
    cfg.MODEL.HARNET.ALIGN.DEFORM_GROUPS = 4
    # GroupNorm groups after each of the block's three convs.
    cfg.MODEL.HARNET.ALIGN.NORM_GROUPS = 32
    # Initial weight of the last GroupNorm: the block starts close to the identity.
    cfg.MODEL.HARNET.ALIGN.LAST_NORM_INIT = 0.1
    # Learning-rate factor of the offset conv (py-HAR: lr_mult 0.1); applied by
    # harnet.solver.build_optimizer through the module's ``lr_factor`` attribute.
    cfg.MODEL.HARNET.ALIGN.OFFSET_LR_FACTOR = 0.1

    # --- Cross-level group norm in the head towers (py-HAR's cross-level GroupNorm layers) ---
    cfg.MODEL.HARNET.CLGN = CN()
    # Tower convs followed by CLGN (statistics over all pyramid levels together). Off: the
    # towers are Detectron2's RetinaNetHead towers (MODEL.RETINANET.NORM applies).
    cfg.MODEL.HARNET.CLGN.ENABLED = True
    # Channel groups; must divide the FPN channels (MODEL.FPN.OUT_CHANNELS).
    cfg.MODEL.HARNET.CLGN.NUM_GROUPS = 32
    # Initial affine weight of the last tower conv's CLGN (the others start at 1).
    cfg.MODEL.HARNET.CLGN.LAST_NORM_INIT = 0.1

    # --- Spatial attention (py-HAR's spatial-attention branches): one mask per pyramid level ---
    cfg.MODEL.HARNET.SPATIAL = CN()
    # A dilated-conv branch on each FPN level predicts a sigmoid mask that multiplies the
    # last tower conv's output of both towers at that level.
    cfg.MODEL.HARNET.SPATIAL.ENABLED = True
    # Channels of the branch's dilated convs.
    cfg.MODEL.HARNET.SPATIAL.CHANNELS = 16
    # Dilation rates of the branch's convs, one list per head level (P3..P7), or a single
    # list used for every level. Reference: 1-2-5-2 on P3-P5, 1-2-3-2 on P6-P7.
    cfg.MODEL.HARNET.SPATIAL.DILATIONS = [[1, 2, 5, 2]] * 3 + [[1, 2, 3, 2]] * 2
    # GroupNorm (no affine) groups after each dilated conv; 0 = no norm (older variant).
    cfg.MODEL.HARNET.SPATIAL.NORM_GROUPS = 4
    # How the mask m re-weights the tower output x: "mul" = x * m (py-HAR's R-50),
    # "residual" = x * (1 + m) (one reference R-101 model).
    cfg.MODEL.HARNET.SPATIAL.MODE = "mul"
    # One branch shared by all levels (the paper's weight-sharing study) instead of one
    # per level; needs the same dilations for every level.
    cfg.MODEL.HARNET.SPATIAL.SHARED = False

    # --- Channel attention (py-HAR's cross-level SE and averaged predictors): cross-level SE + a second predictor ---
    cfg.MODEL.HARNET.CHANNEL = CN()
    # A cross-level squeeze-and-excitation block per tower on the (spatially attended)
    # tower outputs: one channel-weight vector for all levels.
    cfg.MODEL.HARNET.CHANNEL.ENABLED = True
    # Width of the SE bottleneck FC.
    cfg.MODEL.HARNET.CHANNEL.HIDDEN = 32
    # 3x3 conv + ReLU (shared across levels) before the squeeze; False applies SE
    # directly to the last tower conv's output (the reference's channel-only variant).
    cfg.MODEL.HARNET.CHANNEL.EXTRA_CONV = True
    # Two predictor pairs: A on the spatially attended features, B on the channel-attended
    # ones; trained with LOSS_WEIGHTS, logits and deltas averaged at inference.
    # False: a single predictor on the channel-attended features.
    cfg.MODEL.HARNET.CHANNEL.DUAL_PREDICTOR = True
    # Loss weights of predictors A and B (used with DUAL_PREDICTOR).
    cfg.MODEL.HARNET.CHANNEL.LOSS_WEIGHTS = [0.5, 0.5]
    _add_authors_recipe_config(cfg)


def _add_authors_recipe_config(cfg):
    """Switches for the authors' released training/test recipe where Detectron2 has no key
    (the authors' released recipe, py-HAR; configs/HARNet/har_R_*_FPN_authors.yaml turn them on). The defaults are
    Detectron2's RetinaNet behaviour. The other differences use Detectron2's own keys:
    MODEL.BACKBONE.NAME = "build_harnet_resnet_authors_fpn_backbone" (FPN layout and init),
    MODEL.ANCHOR_GENERATOR.NAME = "RoundedAnchorGenerator" with OFFSET = 0.5 (anchors),
    SOLVER.BIAS_LR_FACTOR / WEIGHT_DECAY_BIAS / WEIGHT_DECAY_NORM / WARMUP_* (solver).
    """
    # Weight init of the head's tower convs, both predictor pairs and the SE extra conv, and
    # of the aligned blocks' convs: "detectron2" (N(0, 0.01^2) in the head, MSRA fill in the
    # aligned blocks) or "authors" (Caffe MSRA N(0, 2/fan_in) in the head, N(0, 0.01^2) in
    # the aligned blocks). See harnet/modeling/init.py.
    cfg.MODEL.HARNET.INIT = "detectron2"
    cfg.MODEL.HARNET.LOSS = CN()
    # "running": Detectron2's RetinaNet (sum over levels / running mean of the positives).
    # "per_level": the authors' (each level's focal and box loss sum / max(positive anchors
    # at that level in the batch, PER_LEVEL_MIN)); stateless, per predictor pair.
    cfg.MODEL.HARNET.LOSS.NORMALIZER = "running"
    # Minimum normaliser of "per_level" (authors: 100).
    cfg.MODEL.HARNET.LOSS.PER_LEVEL_MIN = 100.0
    cfg.MODEL.HARNET.CANDIDATES = CN()
    # Per-level candidates at inference: "detectron2" (score > SCORE_THRESH_TEST, top
    # TOPK_CANDIDATES_TEST, decode) or "authors" (decode every anchor, clip to the image,
    # drop boxes with a side under MIN_SIZE original-image pixels, then of the kept anchors'
    # (anchor, class) pairs the top min(TOPK_CANDIDATES_TEST, number of kept anchors) that
    # score >= SCORE_THRESH_TEST, and always the best one; authors' proposal_layer.cpp).
    cfg.MODEL.HARNET.CANDIDATES.MODE = "detectron2"
    # Minimum box side of "authors" candidates, in original-image pixels (authors: 8).
    cfg.MODEL.HARNET.CANDIDATES.MIN_SIZE = 8.0


def _add_postprocess_config(cfg):
    """Post-processing: NMS type (hard / soft), box voting (the paper and py-HAR's test code).

    Read by ``harnet.layers.postprocess_params_from_cfg`` (checked there, errors name the
    key). Detectron2's own keys still apply: ``MODEL.RETINANET.SCORE_THRESH_TEST`` and
    ``TOPK_CANDIDATES_TEST`` select the candidates, ``MODEL.RETINANET.NMS_THRESH_TEST`` is
    the IoU threshold of hard NMS and linear soft-NMS, ``TEST.DETECTIONS_PER_IMAGE`` caps
    the detections. The defaults are Detectron2's RetinaNet post-processing.
    """
    pp = cfg.MODEL.HARNET.POSTPROCESS = CN()
    # Per-category suppression of each image's candidates: "hard" (NMS, Detectron2's
    # default), "linear" soft-NMS (score * (1 - IoU) above NMS_THRESH_TEST) or "gaussian"
    # soft-NMS (score * exp(-IoU^2 / SOFT_NMS_SIGMA); the authors' choice).
    pp.NMS_TYPE = "hard"
    # Width of the Gaussian soft-NMS decay (authors: 0.5).
    pp.SOFT_NMS_SIGMA = 0.5
    # Soft-NMS drops a box once its decayed score falls below this (authors: 0.001).
    pp.SOFT_NMS_MIN_SCORE = 0.001
    # After suppression (and voting), drop detections scoring below this; 0 keeps them all
    # (Detectron2). The authors' released test keeps scores >= 0.05.
    pp.MIN_SCORE = 0.0
    pp.VOTING = CN()
    # Box voting after suppression: each kept box becomes the score-weighted mean of the
    # same-category candidates overlapping it by at least IOU_THRESH.
    pp.VOTING.ENABLED = False
    # Minimum IoU of a voter with the kept box (authors: 0.6; Detectron: 0.8).
    pp.VOTING.IOU_THRESH = 0.6
    # Score of a voted box: "max" (max voter score, the paper), "keep" (unchanged), "avg"
    # (mean voter score), "unclaimed_top4" (the authors' released rule, alias "caffe": the
    # kept box and its <= 4 best unclaimed neighbours, summed score / 5).
    pp.VOTING.SCORING = "max"


def _add_tta_config(cfg):
    """Test-time augmentation merge settings of the TTA of ``harnet.build_tta_model``.

    The views come from Detectron2's keys: ``TEST.AUG.ENABLED`` (evaluate with TTA too),
    ``TEST.AUG.MIN_SIZES`` (short sides), ``TEST.AUG.MAX_SIZE``, ``TEST.AUG.FLIP``. Every
    view's candidates are mapped back to the original image and merged as ``MERGE`` says.
    Checked by the TTA classes (errors name the key).
    """
    # How the views are merged: "suppress" (all views' candidates concatenated and
    # suppressed once with the model's MODEL.HARNET.POSTPROCESS settings) or "wbf" (each
    # view suppressed so on its own, then weighted boxes fusion across views, WBF below).
    cfg.TEST.AUG.MERGE = "suppress"
    wbf = cfg.TEST.AUG.WBF = CN()
    # A view's box joins a cluster when its IoU with the cluster's fused box is above
    # this (Solovyev et al. 2021: 0.55).
    wbf.IOU_THRESH = 0.55
    # Boxes scoring below this are left out of the fusion.
    wbf.SKIP_THRESH = 0.0
    # Score of a fused box: "avg" (the paper: mean score x min(views, boxes) / views),
    # "max" (best score), "box_and_model_avg" (mean score x share of views present).
    wbf.CONF_TYPE = "avg"
    ss = cfg.TEST.AUG.SIZE_SELECT = CN()
    # Size-dependent selection (Detectron's SCALE_SIZE_DEP): views up-scaled relative to
    # the plain test scale (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) contribute no large
    # boxes, down-scaled views no small boxes; views at the test scale contribute all.
    # So small objects come from the larger scales, large objects from the smaller ones.
    ss.ENABLED = False
    # Area (original-image pixels^2) below which a box is small: dropped from down-scaled
    # views.
    ss.SMALL_AREA = 50.0**2
    # Area above which a box is large: dropped from up-scaled views.
    ss.LARGE_AREA = 180.0**2


def _add_data_config(cfg):
    """Built-in dataset settings: cfg.DATASETS.SHAPES (harnet/data/shapes.py).

    ``import harnet`` registers ``harnet_shapes_train`` / ``harnet_shapes_val`` with these
    defaults; a config that changes them takes effect through
    ``harnet.data.register_shapes_from_cfg(cfg)`` (the training script calls it).
    """
    from .data.shapes import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL
    from .data.shapes_render import ShapesSpec

    d = ShapesSpec()
    cfg.DATASETS.SHAPES = CN()
    # Cache root; "" = $HARNET_DATASETS, else ~/.cache/harnet/datasets. Each setting gets
    # its own sub-folder (fingerprinted), generated on first use.
    cfg.DATASETS.SHAPES.ROOT = ""
    # Seed of the train split; the val split uses SEED + 1 (never the same images).
    cfg.DATASETS.SHAPES.SEED = d.seed
    cfg.DATASETS.SHAPES.NUM_TRAIN = DEFAULT_NUM_TRAIN
    cfg.DATASETS.SHAPES.NUM_VAL = DEFAULT_NUM_VAL
    # (min, max) px: each image's height and width are drawn uniformly from this range.
    cfg.DATASETS.SHAPES.IMAGE_SIZE = d.image_size
    # (min, max) px of an object's longer box side, log-uniform (scattered scales) ...
    cfg.DATASETS.SHAPES.OBJECT_SIZE = d.object_size
    # ... capped at this fraction of the image's shorter side.
    cfg.DATASETS.SHAPES.MAX_OBJECT_FRACTION = d.max_object_fraction
    # (min, max) objects attempted per image (overly occluding placements are dropped).
    cfg.DATASETS.SHAPES.OBJECTS_PER_IMAGE = d.objects_per_image
    # (min, max) non-object clutter items (irregular blobs, scribbles) per image.
    cfg.DATASETS.SHAPES.DISTRACTORS_PER_IMAGE = d.distractors_per_image
    # Relative frequencies of circle, ellipse, square, triangle, star, cross (long tail).
    cfg.DATASETS.SHAPES.CLASS_WEIGHTS = d.class_weights
    # Every object keeps at least this fraction of its pixels visible (boxes = visible part).
    cfg.DATASETS.SHAPES.MIN_VISIBLE_FRACTION = d.min_visible_fraction
    # Probability that an object is placed overlapping an existing one.
    cfg.DATASETS.SHAPES.OCCLUSION_PROB = d.occlusion_prob
    # "jpg" (quality 95) or "png".
    cfg.DATASETS.SHAPES.IMAGE_FORMAT = d.image_format


def _add_train_config(cfg):
    """Training: the optimizer choice and the two-step schedule.

    Step 1 trains the main network with some attention switches off, step 2 switches them
    back on and continues from step 1's final weights (the paper, Sec. 4). Step 2 uses
    the config's own switches and the usual SOLVER schedule (MAX_ITER, STEPS, BASE_LR,
    WARMUP_*); outputs go to OUTPUT_DIR/step1 and OUTPUT_DIR/step2.
    """
    # "SGD" (Detectron2's, with MOMENTUM / NESTEROV) or "AdamW" (decoupled WEIGHT_DECAY);
    # both on HARNet's parameter groups (lr factors) with SOLVER.CLIP_GRADIENTS.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # Biases exempt from SOLVER.BIAS_LR_FACTOR / WEIGHT_DECAY_BIAS (harnet.solver
    # BIAS_EXCEPTIONS): "none", or "authors" (the authors' prototxts: FPN, SE-FC and offset
    # conv biases keep weight decay; spatial attention biases at 1x lr with decay).
    cfg.SOLVER.BIAS_EXCEPTIONS = "none"

    ts = cfg.SOLVER.TWO_STEP = CN()
    # Run the two-step schedule (``train_net.py --two-step`` sets it).
    ts.ENABLED = False
    # Names X of the switches cfg.MODEL.HARNET.X.ENABLED turned off in step 1: the spatial
    # and channel attention modules are the ones "added" in step 2. CLGN (the towers' norm)
    # and the aligned attention (backbone) belong to the main network and stay as set.
    ts.STEP1_DISABLE = ("SPATIAL", "CHANNEL")
    # Step 1's number of iterations.
    ts.STEP1_MAX_ITER = 90000
    # Step 1's lr decay iterations (SOLVER.GAMMA each).
    ts.STEP1_STEPS = (60000,)
    # Step 1's base lr; 0 means SOLVER.BASE_LR.
    ts.STEP1_BASE_LR = 0.0
    # Evaluate on DATASETS.TEST at the end of step 1 too (step 2 always evaluates).
    ts.STEP1_EVAL = False
