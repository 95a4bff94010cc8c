"""Bad configs fail when the config or the model is built, with a message naming the key:
unknown keys, wrong types and impossible combinations, through the same path as
``train_net.py`` (``harnet.engine.build_config``) and ``build_model``.

test_configs.py (the model's tests) covers the builders' own value checks; here: the yacs
layer (YAML files and command-line overrides), element types inside lists
(:func:`harnet.config_checks.check_harnet_config`), and checks that live outside the model
(post-processing, TTA, two-step, built-in dataset)."""
import os
import re

import pytest

from detectron2.modeling import build_model

from harnet.config_checks import check_harnet_config
from harnet.engine import argument_parser, two_step_configs
from harnet.engine.defaults import build_config
from robust_utils import CONFIG_DIR, tiny_cfg

# A tiny model that the train_net path can build quickly; datasets that exist here.
_TINY = """
MODEL:
  RESNETS: {DEPTH: 18, RES2_OUT_CHANNELS: 64, STEM_OUT_CHANNELS: 16}
  FPN: {OUT_CHANNELS: 32}
  RETINANET: {NUM_CONVS: 1, NUM_CLASSES: 3}
  HARNET:
    ALIGN: {MID_CHANNELS: [32], NORM_GROUPS: 8}
    CLGN: {NUM_GROUPS: 8}
    SPATIAL: {CHANNELS: 8}
    CHANNEL: {HIDDEN: 8}
DATASETS:
  TRAIN: ("harnet_shapes_train",)
  TEST: ("harnet_shapes_val",)
"""


def _build_config(tmp_path, extra_yaml="", opts=()):
    path = tmp_path / "user.yaml"
    base = os.path.join(CONFIG_DIR, "har_R_50_FPN_1x.yaml")
    path.write_text(f'_BASE_: "{base}"\n' + _TINY + extra_yaml)
    args = argument_parser().parse_args(["--config-file", str(path), *opts])
    return build_config(args)


def _key_re(key):
    return re.escape(key)


def test_valid_user_config_builds(tmp_path):
    cfg = _build_config(tmp_path, opts=["MODEL.HARNET.SPATIAL.MODE", "residual"])
    assert cfg.MODEL.HARNET.SPATIAL.MODE == "residual" and cfg.MODEL.RESNETS.DEPTH == 18
    check_harnet_config(cfg)
    assert type(build_model(cfg)).__name__ == "HARRetinaNet"


# ---------------------------------------------------------------- yacs: unknown keys, types


@pytest.mark.parametrize(
    "yaml, key",
    [
        ("MODEL:\n  HARNET:\n    SPATIAL:\n      DILATION: [[1, 2]]\n", "MODEL.HARNET.SPATIAL.DILATION"),
        ("MODEL:\n  HARNET:\n    ALIGNED:\n      ENABLED: False\n", "MODEL.HARNET.ALIGNED"),
        ("SOLVER:\n  TWO_STEP:\n    STEP_1_MAX_ITER: 10\n", "SOLVER.TWO_STEP.STEP_1_MAX_ITER"),
    ],
)
def test_unknown_key_in_yaml_names_it(tmp_path, yaml, key):
    with pytest.raises(KeyError, match=_key_re(key)):
        _build_config(tmp_path, yaml)


def test_unknown_key_on_command_line_names_it(tmp_path):
    with pytest.raises((KeyError, AssertionError), match=_key_re("MODEL.HARNET.CLGN.GROUPS")):
        _build_config(tmp_path, opts=["MODEL.HARNET.CLGN.GROUPS", "16"])


@pytest.mark.parametrize(
    "yaml, key",
    [
        ('MODEL:\n  HARNET:\n    SPATIAL:\n      ENABLED: "yes"\n', "MODEL.HARNET.SPATIAL.ENABLED"),
        ("MODEL:\n  HARNET:\n    SPATIAL:\n      CHANNELS: 16.5\n", "MODEL.HARNET.SPATIAL.CHANNELS"),
        ("MODEL:\n  HARNET:\n    CLGN:\n      NUM_GROUPS: [8]\n", "MODEL.HARNET.CLGN.NUM_GROUPS"),
        ('MODEL:\n  HARNET:\n    POSTPROCESS:\n      SOFT_NMS_SIGMA: "wide"\n',
         "MODEL.HARNET.POSTPROCESS.SOFT_NMS_SIGMA"),
    ],
)
def test_wrong_type_in_yaml_names_key(tmp_path, yaml, key):
    with pytest.raises(ValueError, match=r"Type mismatch.*" + _key_re(key)):
        _build_config(tmp_path, yaml)


def test_wrong_type_on_command_line_names_key(tmp_path):
    with pytest.raises(ValueError, match=_key_re("MODEL.HARNET.CHANNEL.HIDDEN")):
        _build_config(tmp_path, opts=["MODEL.HARNET.CHANNEL.HIDDEN", "thirty-two"])


# ---------------------------------------------------------------- impossible combinations


def _set(cfg, **changes):
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in changes.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "changes, key",
    [
        # spatial dilations for fewer levels than the head has (P3-P7: 5 levels)
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [[1, 2, 5, 2]] * 3}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        # ... and for more: a head on P3-P5 only
        ({"MODEL.RETINANET.IN_FEATURES": ["p3", "p4", "p5"],
          "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128]]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.SPATIAL.SHARED": True}, "MODEL.HARNET.SPATIAL.SHARED"),
        ({"MODEL.HARNET.CLGN.NUM_GROUPS": 12}, "MODEL.HARNET.CLGN.NUM_GROUPS"),  # 32 channels
        ({"MODEL.RETINANET.NORM": "GN"}, "MODEL.RETINANET.NORM"),  # two tower norms
        ({"MODEL.HARNET.ALIGN.IN_FEATURES": ["res2"]}, "MODEL.HARNET.ALIGN.IN_FEATURES"),
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": [32, 32, 32]}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.POSTPROCESS.NMS_TYPE": "soft"}, "MODEL.HARNET.POSTPROCESS.NMS_TYPE"),
        ({"MODEL.HARNET.POSTPROCESS.VOTING.IOU_THRESH": 1.5},
         "MODEL.HARNET.POSTPROCESS.VOTING.IOU_THRESH"),
    ],
)
def test_impossible_combination_fails_at_build_naming_key(tmp_path, changes, key):
    cfg = _set(tiny_cfg("HARRetinaNet"), **changes)
    with pytest.raises(ValueError, match=_key_re(key)):
        build_model(cfg)


def test_tta_area_thresholds_checked_at_build():
    from harnet import HARRetinaNetWithTTA

    cfg = tiny_cfg("HARRetinaNet")
    model = build_model(cfg)
    cfg = _set(cfg, **{"TEST.AUG.SIZE_SELECT.ENABLED": True,
                       "TEST.AUG.SIZE_SELECT.SMALL_AREA": 200.0 ** 2})
    with pytest.raises(ValueError, match=_key_re("TEST.AUG.SIZE_SELECT.SMALL_AREA")):
        HARRetinaNetWithTTA(cfg, model)


def test_two_step_unknown_switch_names_key():
    cfg = _set(tiny_cfg("HARRetinaNet"), **{"SOLVER.TWO_STEP.STEP1_DISABLE": ("SPATIALL",)})
    with pytest.raises(KeyError, match=_key_re("SOLVER.TWO_STEP.STEP1_DISABLE") + ".*SPATIALL"):
        two_step_configs(cfg)


def test_builtin_dataset_settings_checked_when_config_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"(?i)image_size"):
        _build_config(tmp_path, opts=["DATASETS.SHAPES.IMAGE_SIZE", "(100,)"])


# ---------------------------------------------------------------- element types inside lists


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [1, 2, 5, 2]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [[1, 2.5, 5, 2]]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [[1, "a", 5, 2]]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [[]]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": ["256"]}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": [32.0]}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": []}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.ALIGN.IN_FEATURES": [4]}, "MODEL.HARNET.ALIGN.IN_FEATURES"),
        ({"MODEL.HARNET.ALIGN.OFFSET_LR_FACTOR": -0.1}, "MODEL.HARNET.ALIGN.OFFSET_LR_FACTOR"),
        ({"MODEL.HARNET.ALIGN.LAST_NORM_INIT": float("nan")}, "MODEL.HARNET.ALIGN.LAST_NORM_INIT"),
        ({"MODEL.HARNET.CHANNEL.LOSS_WEIGHTS": ["a", "b"]}, "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS"),
        ({"MODEL.HARNET.CHANNEL.LOSS_WEIGHTS": [0.5, 0.5, 0.5]},
         "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS"),
        ({"MODEL.HARNET.CHANNEL.HIDDEN": 0}, "MODEL.HARNET.CHANNEL.HIDDEN"),
        ({"MODEL.HARNET.SPATIAL.NORM_GROUPS": -1}, "MODEL.HARNET.SPATIAL.NORM_GROUPS"),
    ],
)
def test_check_harnet_config_names_key(changes, key):
    cfg = _set(tiny_cfg("HARRetinaNet"), **changes)
    with pytest.raises(ValueError, match=_key_re(key)):
        check_harnet_config(cfg)


@pytest.mark.parametrize(
    "config_file",
    sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")),
)
def test_check_harnet_config_accepts_shipped_configs(config_file):
    from detectron2.config import get_cfg

    import harnet

    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
    check_harnet_config(cfg)
