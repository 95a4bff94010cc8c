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
from harnet_model_utils import CONFIG_DIR, TINY_MODEL_YAML, set_keys, tiny_cfg, write_coco

# The tests' tiny model, with datasets that exist here.
_TINY = TINY_MODEL_YAML + """
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
        # Module arguments, checked by the module, named by the builder (config_keys).
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [[1, 0, 5]]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.SPATIAL.MODE": "add"}, "MODEL.HARNET.SPATIAL.MODE"),
        ({"MODEL.HARNET.SPATIAL.NORM_GROUPS": 3}, "MODEL.HARNET.SPATIAL.NORM_GROUPS"),
        ({"MODEL.HARNET.CLGN.NUM_GROUPS": 7}, "MODEL.HARNET.CLGN.NUM_GROUPS"),
        ({"MODEL.HARNET.ALIGN.IN_FEATURES": []}, "MODEL.HARNET.ALIGN.IN_FEATURES"),
        ({"MODEL.HARNET.ALIGN.DEFORM_GROUPS": 5}, "MODEL.HARNET.ALIGN.DEFORM_GROUPS"),
        ({"MODEL.HARNET.ALIGN.NORM_GROUPS": 48}, "MODEL.HARNET.ALIGN.NORM_GROUPS"),
        ({"MODEL.HARNET.CHANNEL.LOSS_WEIGHTS": [0.5]}, "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS"),
        ({"MODEL.HARNET.CHANNEL.LOSS_WEIGHTS": [0.5, -1.0]}, "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS"),
        ({"MODEL.HARNET.SPATIAL.DILATIONS": [[]]}, "MODEL.HARNET.SPATIAL.DILATIONS"),
        ({"MODEL.HARNET.CHANNEL.HIDDEN": 0}, "MODEL.HARNET.CHANNEL.HIDDEN"),
        ({"MODEL.HARNET.SPATIAL.NORM_GROUPS": -1}, "MODEL.HARNET.SPATIAL.NORM_GROUPS"),
        ({"MODEL.HARNET.POSTPROCESS.VOTING.IOU_THRESH": 1.5},
         "MODEL.HARNET.POSTPROCESS.VOTING.IOU_THRESH"),
    ],
)
def test_impossible_combination_fails_at_build_naming_key(tmp_path, changes, key):
    cfg = set_keys(tiny_cfg("HARRetinaNet"), **changes)
    with pytest.raises(ValueError, match=_key_re(key)):
        build_model(cfg)


def test_tta_area_thresholds_checked_at_build():
    from harnet import HARRetinaNetWithTTA

    cfg = tiny_cfg("HARRetinaNet")
    model = build_model(cfg)
    cfg = set_keys(cfg, **{"TEST.AUG.SIZE_SELECT.ENABLED": True,
                       "TEST.AUG.SIZE_SELECT.SMALL_AREA": 200.0 ** 2})
    with pytest.raises(ValueError, match=_key_re("TEST.AUG.SIZE_SELECT.SMALL_AREA")):
        HARRetinaNetWithTTA(cfg, model)


def test_two_step_unknown_switch_names_key():
    cfg = set_keys(tiny_cfg("HARRetinaNet"), **{"SOLVER.TWO_STEP.STEP1_DISABLE": ("SPATIALL",)})
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
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": ["256"]}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": [32.0]}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.ALIGN.MID_CHANNELS": []}, "MODEL.HARNET.ALIGN.MID_CHANNELS"),
        ({"MODEL.HARNET.ALIGN.IN_FEATURES": [4]}, "MODEL.HARNET.ALIGN.IN_FEATURES"),
        ({"MODEL.HARNET.ALIGN.OFFSET_LR_FACTOR": -0.1}, "MODEL.HARNET.ALIGN.OFFSET_LR_FACTOR"),
        ({"MODEL.HARNET.ALIGN.LAST_NORM_INIT": float("nan")}, "MODEL.HARNET.ALIGN.LAST_NORM_INIT"),
        ({"MODEL.HARNET.CHANNEL.LOSS_WEIGHTS": ["a", "b"]}, "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS"),
        ({"MODEL.HARNET.CHANNEL.LOSS_WEIGHTS": [0.5, 0.5, 0.5]},
         "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS"),
    ],
)
def test_check_harnet_config_names_key(changes, key):
    cfg = set_keys(tiny_cfg("HARRetinaNet"), **changes)
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


# --- every mistake named before any work ------------------------------------
DEMO_PY = os.path.join(CONFIG_DIR, "demo", "har_R18_shapes_demo.py")


@pytest.mark.parametrize("opts, key", [
    (["SOLVER.MAX_ITER", "-5"], "SOLVER.MAX_ITER"),
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER"),
    (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD"),
    (["SOLVER.STEPS", "(-1,)"], "SOLVER.STEPS"),
])
def test_impossible_schedule_names_key(tmp_path, opts, key):
    # Before: "Total num_updates must be greater than length of param schedule" from the
    # lr scheduler, when the trainer was built.
    with pytest.raises(ValueError, match=_key_re(key)):
        _build_config(tmp_path, opts=opts)


def test_schedule_not_checked_for_eval_only(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text(f'_BASE_: "{os.path.join(CONFIG_DIR, "har_R_50_FPN_1x.yaml")}"\n' + _TINY)
    args = argument_parser().parse_args(["--config-file", str(path), "SOLVER.MAX_ITER", "0"])
    assert build_config(args, purpose="eval").SOLVER.MAX_ITER == 0


@pytest.mark.parametrize("opts, key", [
    (["TEST.AUG.MIN_SIZES", "()"], "TEST.AUG.MIN_SIZES"),
    (["TEST.AUG.MIN_SIZES", "('a',)"], "TEST.AUG.MIN_SIZES"),
    (["TEST.AUG.MIN_SIZES", "(0, 100)"], "TEST.AUG.MIN_SIZES"),
    (["TEST.AUG.MAX_SIZE", "0"], "TEST.AUG.MAX_SIZE"),
    (["TEST.AUG.MERGE", "'vote'"], "TEST.AUG.MERGE"),
    (["TEST.AUG.MERGE", "'wbf'", "TEST.AUG.WBF.IOU_THRESH", "1.5"], "TEST.AUG.WBF.IOU_THRESH"),
])
def test_bad_tta_settings_fail_when_the_config_is_built(tmp_path, opts, key):
    # Before: torch.cat / AssertionError / PIL errors after the whole plain evaluation.
    opts = ["TEST.AUG.ENABLED", "True"] + opts
    with pytest.raises(ValueError, match=_key_re(key)):
        _build_config(tmp_path, opts=opts)
    _build_config(tmp_path, opts=opts[2:])  # TTA off: the settings are unused


def test_demo_config_tta_sizes_fit_its_images():
    args = argument_parser().parse_args(
        ["--config-file", os.path.join(CONFIG_DIR, "demo", "har_R18_shapes_demo.yaml")])
    cfg = build_config(args, purpose="draw")
    # Detectron2's defaults are 400-1200 px; the demo's images are 128-160 px.
    assert max(cfg.TEST.AUG.MIN_SIZES) <= 2 * cfg.INPUT.MIN_SIZE_TEST
    assert cfg.TEST.AUG.MAX_SIZE <= 2 * cfg.INPUT.MAX_SIZE_TEST


@pytest.mark.parametrize("override, error, words", [
    ("train.max_iters=10", KeyError, ["train.max_iters", "did you mean train.max_iter"]),
    ("foo.bar=1", KeyError, ["foo.bar"]),
    ("train.max_iter=abc", ValueError, ["train.max_iter", "int", "'abc'"]),
    ("optimizer.lr=fast", ValueError, ["optimizer.lr"]),
    ("train.amp.enabled=1", ValueError, ["train.amp.enabled", "bool"]),
    ("train.max_iter", ValueError, ["key=value"]),
])
def test_lazy_config_overrides_are_checked(override, error, words):
    # Before: unknown keys were added silently; max_iter=abc failed in the lr scheduler.
    args = argument_parser().parse_args(["--config-file", DEMO_PY, override])
    with pytest.raises(error) as e:
        build_config(args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_lazy_config_valid_overrides_apply():
    args = argument_parser().parse_args(
        ["--config-file", DEMO_PY, "train.max_iter=10", "optimizer.lr=1", "train.output_dir=x"])
    cfg = build_config(args)
    assert (cfg.train.max_iter, cfg.optimizer.lr, cfg.train.output_dir) == (10, 1, "x")
    with pytest.raises(ValueError, match="train.max_iter"):
        build_config(argument_parser().parse_args(["--config-file", DEMO_PY, "train.max_iter=0"]))


def _coco_json(tmp_path):
    """An empty COCO-format dataset (one category) to register."""
    return write_coco(tmp_path, [], [(1, "a")], json_name="my.json", image_dir="imgs")


@pytest.mark.parametrize("name", ["harnet_shapes_val", "coco_2017_val"])
def test_register_coco_of_a_registered_name_fails_naming_it(tmp_path, name):
    # Before: silently ignored (harnet_shapes_val: the built-in set was evaluated).
    json_file, root = _coco_json(tmp_path)
    args = argument_parser().parse_args(
        ["--config-file", DEMO_PY, "--register-coco", name, json_file, root])
    with pytest.raises(ValueError, match=f"--register-coco {name} .*already registered"):
        build_config(args)


def test_register_coco_twice_in_one_process(tmp_path):
    from detectron2.data import DatasetCatalog

    json_file, root = _coco_json(tmp_path)
    name = f"issue17_{os.getpid()}_{tmp_path.name}"
    argv = ["--config-file", DEMO_PY, "--register-coco", name, json_file, root]
    try:
        build_config(argument_parser().parse_args(argv))
        build_config(argument_parser().parse_args(argv))  # same files again: fine
        other, _ = _coco_json(tmp_path / "..")
        with pytest.raises(ValueError, match="earlier --register-coco"):
            build_config(argument_parser().parse_args(argv[:4] + [other, root]))
        with pytest.raises(ValueError, match="given 2 times"):
            build_config(argument_parser().parse_args(argv + argv[2:]))
    finally:
        DatasetCatalog.remove(name)


def test_commands_check_only_the_datasets_they_use(tmp_path):
    # Before: --eval-only and visualize --input needed DATASETS.TRAIN's files.
    path = tmp_path / "user.yaml"
    path.write_text(f'_BASE_: "{os.path.join(CONFIG_DIR, "har_R_50_FPN_1x.yaml")}"\n' + _TINY)
    json_file, root = _coco_json(tmp_path)
    argv = ["--config-file", str(path), "--register-coco", f"issue17_val_{tmp_path.name}",
            json_file, root, "DATASETS.TRAIN", "('coco_2017_train',)",
            "DATASETS.TEST", f"('issue17_val_{tmp_path.name}',)"]
    with pytest.raises(FileNotFoundError, match="coco_2017_train"):
        build_config(argument_parser().parse_args(argv))
    assert build_config(argument_parser().parse_args(argv), purpose="eval")
    argv[-1] = "('coco_2017_val',)"
    with pytest.raises(FileNotFoundError, match="coco_2017_val"):
        build_config(argument_parser().parse_args(argv), purpose="eval")
    assert build_config(argument_parser().parse_args(argv), purpose="draw")


def test_lazy_config_override_of_a_call_argument_left_at_its_default():
    # model.test_score_thresh is an argument of RetinaNet with a default: not in the
    # config, but a valid override (Detectron2 passes it to the call); a misspelt one is not.
    cfg = build_config(argument_parser().parse_args(
        ["--config-file", DEMO_PY, "model.test_score_thresh=0.0"]))
    assert cfg.model.test_score_thresh == 0.0
    with pytest.raises(KeyError, match="model.test_score_thresj"):
        build_config(argument_parser().parse_args(
            ["--config-file", DEMO_PY, "model.test_score_thresj=0.0"]))
