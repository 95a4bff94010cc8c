"""configs/HARNet: every yaml builds the model it describes, the LazyConfig twin builds the
same model as its yaml, and bad values fail with errors that name the key."""

import copy
import glob
import os

import pytest
import torch
import yaml
from fvcore.common.config import CfgNode

from detectron2 import model_zoo
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from harnet.modeling import AlignedResNet, HARRetinaNet
from harnet_model_utils import CONFIG_DIR, har_cfg, losses_of, make_inputs, perturb_, set_keys, single_thread

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

YAMLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
# Every config file of the repository, LazyConfig twins and the demo's included.
ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for ext in ("yaml", "py")
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*." + ext), recursive=True)
)


def _full_size(config_file):
    cfg = har_cfg(config_file, tiny=False)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("config_file", ALL_CONFIGS)
def test_config_loads_safely_and_builds_its_model(config_file):
    # yacs files: plain yaml.safe_load, and fvcore's loader with unsafe yaml tags refused
    # along the whole _BASE_ chain (so no "Your machine may be at risk" warning on any run).
    path = os.path.join(CONFIG_DIR, config_file)
    if config_file.endswith(".yaml"):
        with open(path) as f:
            assert isinstance(yaml.safe_load(f), dict)
        CfgNode.load_yaml_with_base(path, allow_unsafe=False)
        model = build_model(_full_size(config_file))
    else:
        model = instantiate(LazyConfig.load(path).model)
    assert isinstance(model, HARRetinaNet)


def test_expected_configs_exist():
    for name in (
        "Base-HARNet.yaml",
        "har_R_50_FPN_1x.yaml",
        "har_R_50_FPN_1x_baseline.yaml",
        "har_R_50_FPN_1x_spatial_only.yaml",
        "har_R_50_FPN_1x_channel_only.yaml",
        "har_R_50_FPN_1x_aligned_only.yaml",
        "har_R_101_FPN_3x.yaml",
        "har_R_50_FPN_authors.yaml",
        "har_R_50_FPN_1x_step1.yaml",
        "har_R_50_FPN_1x_step2.yaml",
    ):
        assert name in YAMLS


@pytest.mark.parametrize("config_file", YAMLS)
def test_yaml_builds_the_model_it_describes(config_file):
    cfg = _full_size(config_file)
    model = build_model(cfg)
    assert isinstance(model, HARRetinaNet)
    har = cfg.MODEL.HARNET
    names = [n for n, _ in model.named_parameters()]
    assert isinstance(model.backbone.bottom_up, AlignedResNet) == har.ALIGN.ENABLED
    for marker, on in (
        ("aligned_attention", har.ALIGN.ENABLED),
        ("head.cls_subnet_norm", har.CLGN.ENABLED),
        ("head.spatial_attention", har.SPATIAL.ENABLED),
        ("head.cls_channel_attention", har.CHANNEL.ENABLED),
    ):
        assert any(marker in n for n in names) == on, marker
    depth = cfg.MODEL.RESNETS.DEPTH
    assert len(model.backbone.bottom_up.res4) == {50: 6, 101: 23}[depth]
    # A tiny forward (64x64) keeps the test cheap; the output comes back in input size.
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255}])
    assert out[0]["instances"].image_size == (64, 64)


def test_full_hybrid_is_the_default_and_settings_match_the_reference():
    cfg = _full_size("har_R_50_FPN_1x.yaml")
    har = cfg.MODEL.HARNET
    assert all(har[s].ENABLED for s in ("ALIGN", "CLGN", "SPATIAL", "CHANNEL"))
    assert list(har.ALIGN.IN_FEATURES) == ["res4", "res5"] and har.ALIGN.DEFORM_GROUPS == 4
    assert har.CLGN.NUM_GROUPS == 32 and har.CLGN.LAST_NORM_INIT == 0.1
    assert [list(d) for d in har.SPATIAL.DILATIONS] == [[1, 2, 5, 2]] * 3 + [[1, 2, 3, 2]] * 2
    assert har.SPATIAL.CHANNELS == 16 and har.SPATIAL.NORM_GROUPS == 4
    assert har.CHANNEL.HIDDEN == 32 and list(har.CHANNEL.LOSS_WEIGHTS) == [0.5, 0.5]
    # Detectron2's RetinaNet R-50-FPN 1x recipe.
    d2 = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    for section in ("SOLVER", "INPUT", "DATASETS"):
        for key in d2[section]:  # HARNet may add keys of its own to these sections
            assert cfg[section][key] == d2[section][key], f"{section}.{key}"
    assert cfg.MODEL.ANCHOR_GENERATOR == d2.MODEL.ANCHOR_GENERATOR
    assert cfg.MODEL.RETINANET == d2.MODEL.RETINANET
    assert cfg.MODEL.RESNETS == d2.MODEL.RESNETS and cfg.MODEL.FPN == d2.MODEL.FPN


def test_baseline_is_detectron2_retinanet_r50():
    ours = build_model(_full_size("har_R_50_FPN_1x_baseline.yaml"))
    d2_cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    d2_cfg.MODEL.DEVICE = "cpu"
    d2 = build_model(d2_cfg)
    a, b = ours.state_dict(), d2.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_authors_config_builds_six_rounded_anchors_per_location():
    cfg = _full_size("har_R_50_FPN_authors.yaml")
    model = build_model(cfg)
    assert model.anchor_generator.num_cell_anchors == [6] * 5
    sizes = list(model.anchor_generator.cell_anchors)[0]
    wh = torch.stack([sizes[:, 2] - sizes[:, 0], sizes[:, 3] - sizes[:, 1]], 1)
    # P3: the authors' rounded 8-px base boxes (ratios 0.5, 1, 2: 11x6, 8x8, 6x12) times the
    # scales 4 and 4*sqrt(2) (tests/test_authors_recipe.py checks every level and position).
    base = torch.tensor([[11.0, 6.0], [8.0, 8.0], [6.0, 12.0]])
    torch.testing.assert_close(wh, torch.cat([base * 4, base * 4 * 2**0.5]))
    assert model.smooth_l1_beta == 0.01 and model.box_reg_loss_type == "smooth_l1"
    assert tuple(model.box2box_transform.weights) == (1.0, 1.0, 1.0, 1.0)
    assert cfg.SOLVER.BASE_LR == 0.005 and tuple(cfg.SOLVER.STEPS) == (60000,)
    assert cfg.SOLVER.MAX_ITER == 90000
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1200)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (560, 800) and cfg.INPUT.MAX_SIZE_TRAIN == 1500
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    assert model.head.cls_score.out_channels == 6 * cfg.MODEL.RETINANET.NUM_CLASSES


def test_two_step_configs_chain():
    s1, s2 = _full_size("har_R_50_FPN_1x_step1.yaml"), _full_size("har_R_50_FPN_1x_step2.yaml")
    assert s1.MODEL.HARNET.ALIGN.ENABLED and s1.MODEL.HARNET.CLGN.ENABLED
    assert not s1.MODEL.HARNET.SPATIAL.ENABLED and not s1.MODEL.HARNET.CHANNEL.ENABLED
    assert all(s2.MODEL.HARNET[s].ENABLED for s in ("ALIGN", "CLGN", "SPATIAL", "CHANNEL"))
    assert os.path.normpath(s2.MODEL.WEIGHTS) == os.path.normpath(
        os.path.join(s1.OUTPUT_DIR, "model_final.pth")
    )


# ------------------------------------------------------------- LazyConfig twin
@pytest.fixture(scope="module")
def yaml_and_lazy():
    torch.manual_seed(0)
    from_yaml = perturb_(build_model(_full_size("har_R_50_FPN_1x.yaml")), scale=0.02)
    lazy_cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "har_R_50_FPN_1x.py"))
    from_lazy = instantiate(lazy_cfg.model)
    return from_yaml, from_lazy, lazy_cfg


def test_lazy_twin_has_same_parameters(yaml_and_lazy):
    from_yaml, from_lazy, _ = yaml_and_lazy
    a, b = from_yaml.state_dict(), from_lazy.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    pa = {n: p.requires_grad for n, p in from_yaml.named_parameters()}
    pb = {n: p.requires_grad for n, p in from_lazy.named_parameters()}
    assert pa == pb  # same frozen stages
    assert from_lazy.postprocess_params == from_yaml.postprocess_params
    assert from_lazy.predictor_loss_weights == from_yaml.predictor_loss_weights


def test_lazy_twin_same_outputs_with_same_weights(yaml_and_lazy):
    from_yaml, from_lazy, _ = yaml_and_lazy
    from_lazy.load_state_dict(from_yaml.state_dict(), strict=True)
    for m in (from_yaml, from_lazy):
        m.test_score_thresh, m.test_topk_candidates = 0.0, 50
        m.__dict__.pop("loss_normalizer", None)
    inputs = make_inputs(sizes=((64, 80), (48, 64)))
    losses = losses_of((from_yaml, from_lazy), inputs)
    assert (
        set(losses[0])
        == set(losses[1])
        == {"loss_cls", "loss_box_reg", "loss_cls_channel", "loss_box_reg_channel"}
    )
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k]), k
    outs = []
    for m in (from_yaml, from_lazy):
        m.eval()
        with torch.no_grad():
            outs.append(m(copy.deepcopy(inputs)))
    for a, b in zip(*outs):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_lazy_twin_optimizer_applies_offset_lr_factor(yaml_and_lazy):
    _, from_lazy, lazy_cfg = yaml_and_lazy
    opt_cfg = copy.deepcopy(lazy_cfg.optimizer)
    opt_cfg.params.model = from_lazy
    opt = instantiate(opt_cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    offset = from_lazy.backbone.bottom_up.aligned_attention["res5"].conv2_offset.weight
    assert lr_of[id(offset)] == pytest.approx(0.1 * lazy_cfg.optimizer.lr)
    assert lr_of[id(from_lazy.head.cls_score.weight)] == lazy_cfg.optimizer.lr


# ------------------------------------------------------------- config handling
# (bad values naming the key: tests/test_config_errors.py)
def _tiny(**changes):
    return set_keys(har_cfg(), **changes)


def test_unknown_key_is_rejected_when_merging():
    cfg = har_cfg()
    # yacs raises KeyError for files, AssertionError for lists; both name the key.
    with pytest.raises((KeyError, AssertionError), match=r"MODEL\.HARNET\.SPATIAL\.DILATION"):
        cfg.merge_from_list(["MODEL.HARNET.SPATIAL.DILATION", "[[1, 2]]"])


def test_one_dilation_row_is_used_for_every_level():
    cfg = _tiny(**{"MODEL.HARNET.SPATIAL.DILATIONS": [[1, 3, 1]]})
    head = build_model(cfg).head
    assert [b.dilations for b in head.spatial_attention] == [(1, 3, 1)] * 5


def test_demo_lazy_twin_builds_the_same_model_and_initial_norms():
    # The demo's yaml and LazyConfig build the same parameters, and the constant-initialised
    # ones (every norm's weight and bias, the CLGN last scale 1.0 among them) start equal.
    yaml_cfg = har_cfg(os.path.join("demo", "har_R18_shapes_demo.yaml"), tiny=False)
    yaml_cfg.MODEL.DEVICE = "cpu"  # the config names no device; Detectron2's default is cuda
    from_yaml = build_model(yaml_cfg)
    from_lazy = instantiate(
        LazyConfig.load(os.path.join(CONFIG_DIR, "demo", "har_R18_shapes_demo.py")).model
    )
    a, b = from_yaml.state_dict(), from_lazy.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    norms = [k for k in a if "norm" in k and k.endswith((".weight", ".bias"))]
    assert any(k.startswith("head.cls_subnet_norm") for k in norms)
    for k in norms:
        assert torch.equal(a[k], b[k]), k
    assert yaml_cfg.MODEL.HARNET.CLGN.LAST_NORM_INIT == 1.0
    assert torch.all(from_yaml.head.cls_subnet_norm[-1].weight == 1.0)
