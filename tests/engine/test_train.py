"""Training / evaluation entry points (train_net.py's main, HARNetTrainer, the LazyConfig
trainer, the two-step driver, the visualiser) on a tiny built-in shapes dataset.

Everything is the CPU demo config shrunk by command-line overrides: 64 px images, a few
images, a few iterations.
"""
from harnet_model_utils import REPO
import json
import os

import numpy as np
import pytest
import torch

import harnet  # noqa: F401  (registers the model and datasets)
from detectron2.config import get_cfg

from harnet.engine import HARNetTrainer, argument_parser, main
from harnet.data import register_shapes
from harnet.engine.defaults import build_config
from harnet_model_utils import DEMO_YAML, no_own_warnings, tiny_opts, write_coco

ROOT = REPO
DEMO_PY = os.path.join(ROOT, "configs", "HARNet", "demo", "har_R18_shapes_demo.py")
BBOX_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def run(argv):
    return main(argument_parser().parse_args(argv))


def check_bbox_metrics(results, dataset="harnet_shapes_val"):
    bbox = results[dataset]["bbox"]
    assert BBOX_KEYS <= set(bbox), bbox
    for k in BBOX_KEYS:
        v = bbox[k]
        # NaN only for an area range without ground truth.
        assert np.isnan(v) or 0.0 <= v <= 100.0, (k, v)
    assert np.isfinite(bbox["AP"])


def iteration_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


def test_train_checkpoint_resume_eval(tmp_path, data_root):
    out = str(tmp_path / "run")
    opts = tiny_opts(data_root, out, max_iter=4)
    with no_own_warnings():
        res = run(["--config-file", DEMO_YAML] + opts)
    # Training ends with an evaluation (EvalHook after the last iteration).
    assert BBOX_KEYS <= set(res["bbox"])
    files = sorted(os.listdir(out))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint",
            "config.yaml", "metrics.json"} <= set(files), files
    assert iteration_of(os.path.join(out, "model_final.pth")) == 3
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert {"model", "trainer", "iteration"} <= set(final)
    # The optimizer state (momentum / moments) is checkpointed: a resumed run continues exactly.
    assert final["trainer"]["_trainer"]["optimizer"]["state"]

    # --resume continues after the last checkpoint: iteration 4, with its weights.
    args = argument_parser().parse_args(["--resume", "--config-file", DEMO_YAML] + tiny_opts(
        data_root, out, max_iter=6))
    cfg = build_config(args)
    trainer = HARNetTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, final["model"][k], rtol=0, atol=0, msg=k)
    assert trainer.scheduler.last_epoch == final["trainer"]["hooks"]["LRScheduler"]["last_epoch"]
    momentum = final["trainer"]["_trainer"]["optimizer"]["state"]
    loaded = trainer.optimizer.state_dict()["state"]
    assert set(loaded) == set(momentum)
    for i in momentum:  # every optimizer state tensor (SGD momentum, AdamW moments)
        assert set(loaded[i]) == set(momentum[i])
        for name, value in momentum[i].items():
            torch.testing.assert_close(loaded[i][name], value, msg=f"{i}.{name}")
    del trainer
    # ... and through train_net's main: the new final checkpoint is iteration 5.
    run(["--resume", "--config-file", DEMO_YAML] + tiny_opts(data_root, out, max_iter=6))
    assert iteration_of(os.path.join(out, "model_final.pth")) == 5
    assert os.path.exists(os.path.join(out, "model_0000005.pth"))
    with open(os.path.join(out, "metrics.json")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    # The writer logs training scalars at the end of each run: iteration 3, then 5 (a run
    # restarted from 0 would also log <= 3 again).
    assert [m["iteration"] for m in lines if "total_loss" in m] == [3, 5]

    # --eval-only: COCO metrics of the checkpoint.
    with no_own_warnings():
        res = run(["--eval-only", "--config-file", DEMO_YAML] + tiny_opts(data_root, out) + [
            "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")])
    check_bbox_metrics(res)
    # ... also written for scripts, NaN (area ranges without ground truth) included.
    with open(os.path.join(out, "eval_results.json")) as f:
        written = json.load(f)
    assert set(written) == set(res) == {"harnet_shapes_val"}
    for k, v in res["harnet_shapes_val"]["bbox"].items():
        w = written["harnet_shapes_val"]["bbox"][k]
        assert (np.isnan(v) and np.isnan(w)) or w == v, k
    results_json = os.path.join(out, "inference", "coco_instances_results.json")
    with open(results_json) as f:
        dets = json.load(f)
    assert len(dets) > 0 and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])


def test_eval_only_loads_the_given_weights(tmp_path, data_root):
    # The same checkpoint evaluated twice gives the same detections; an untrained model
    # different ones (so the weights were really loaded and used).
    out = str(tmp_path / "run")
    run(["--config-file", DEMO_YAML] + tiny_opts(data_root, out, max_iter=2) + ["TEST.EVAL_PERIOD", "0"])
    ckpt = os.path.join(out, "model_final.pth")

    def detections(name, weights, seed="0"):
        d = str(tmp_path / name)
        res = run(["--eval-only", "--config-file", DEMO_YAML] + tiny_opts(data_root, d) + [
            "MODEL.WEIGHTS", weights, "SEED", seed])
        check_bbox_metrics(res)
        with open(os.path.join(d, "inference", "coco_instances_results.json")) as f:
            return json.load(f)

    a, b = detections("a", ckpt), detections("b", ckpt, seed="7")
    untrained = detections("u", "", seed="123")
    assert a == b
    assert a != untrained


def test_lazy_config_with_overrides(tmp_path, data_root):
    from harnet.data import register_shapes

    shapes = dict(image_size=(64, 64), object_size=(8.0, 40.0), objects_per_image=(2, 4))
    register_shapes("test_lazy_train", data_root, seed=5, num_images=4, **shapes)
    register_shapes("test_lazy_val", data_root, seed=6, num_images=2, **shapes)
    out = str(tmp_path / "lazy")
    res = run([
        "--config-file", DEMO_PY,
        f"train.output_dir={out}",
        "train.max_iter=3",
        "train.checkpointer.period=2",
        "dataloader.train.dataset.names=test_lazy_train",
        "dataloader.test.dataset.names=test_lazy_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=64",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=64",
        "model.test_score_thresh=0.0",
        "optimizer.lr=0.001",
        "harnet.tta.enabled=True", "harnet.tta.min_sizes=[48,64]", "harnet.tta.max_size=64",
    ])
    assert BBOX_KEYS <= set(res["bbox"])
    # harnet.tta.enabled: a TTA evaluation after training, like TEST.AUG.ENABLED.
    assert os.path.isfile(os.path.join(out, "inference_TTA", "coco_instances_results.json"))
    assert {"model_0000001.pth", "model_final.pth", "config.yaml"} <= set(os.listdir(out))
    assert iteration_of(os.path.join(out, "model_final.pth")) == 2
    # The overrides reached the objects: the optimizer's lr (end of a 3-iteration warmup-free
    # step schedule: the multiplier is 1) and the data.
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert max(final["trainer"]["hooks"]["LRScheduler"]["base_lrs"]) == pytest.approx(0.001)

    # --resume through the LazyConfig trainer continues from iteration 3.
    from harnet.engine import LazyConfigTrainer

    args = argument_parser().parse_args([
        "--config-file", DEMO_PY, f"train.output_dir={out}", "train.max_iter=5",
        "dataloader.train.dataset.names=test_lazy_train", "dataloader.train.num_workers=0",
        "dataloader.train.total_batch_size=2",
    ])
    trainer = LazyConfigTrainer(build_config(args))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3


def test_two_step_training_starts_step_two_from_step_one_weights(tmp_path, data_root):
    out = str(tmp_path / "two")
    opts = tiny_opts(data_root, out, max_iter=2) + [
        "SOLVER.TWO_STEP.STEP1_MAX_ITER", "3",
        "SOLVER.TWO_STEP.STEP1_STEPS", "()",
        "SOLVER.TWO_STEP.STEP1_BASE_LR", "0.01",
        # Step 2 with lr 0: its final weights must be step 1's wherever step 1 had them.
        "SOLVER.BASE_LR", "0.0",
        # GroupNorm: the demo's BatchNorm would update its running statistics (buffers)
        # in step 2 even at lr 0.
        "MODEL.RESNETS.NORM", "GN",
    ]
    res = run(["--two-step", "--config-file", DEMO_YAML] + opts)
    check_bbox_metrics({"harnet_shapes_val": res})
    s1 = torch.load(os.path.join(out, "step1", "model_final.pth"), map_location="cpu", weights_only=False)
    s2 = torch.load(os.path.join(out, "step2", "model_final.pth"), map_location="cpu", weights_only=False)
    assert s1["iteration"] == 2 and s2["iteration"] == 1
    # Step 1 is the main network: no spatial / channel attention parameters; step 2 has them.
    attention = [k for k in s2["model"] if k not in s1["model"]]
    assert attention and all(("spatial" in k or "channel" in k or "se" in k.split(".")) for k in attention), attention
    assert not [k for k in s1["model"] if k not in s2["model"]]
    # Step 2 started from step 1's final weights (and lr 0 kept them).
    for k, v in s1["model"].items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(s2["model"][k], v, rtol=0, atol=0, msg=k)
    # Step 1's config: attention off, its own schedule; step 2: attention on.
    cfg1 = get_cfg()
    harnet.add_harnet_config(cfg1)
    cfg1.merge_from_file(os.path.join(out, "step1", "config.yaml"))
    assert not cfg1.MODEL.HARNET.SPATIAL.ENABLED and not cfg1.MODEL.HARNET.CHANNEL.ENABLED
    assert cfg1.MODEL.HARNET.ALIGN.ENABLED and cfg1.SOLVER.MAX_ITER == 3

    # --resume with both steps finished: both are skipped (nothing rewritten).
    mtimes = {p: os.path.getmtime(os.path.join(out, p, "model_final.pth")) for p in ("step1", "step2")}
    run(["--two-step", "--resume", "--config-file", DEMO_YAML] + opts)
    assert mtimes == {p: os.path.getmtime(os.path.join(out, p, "model_final.pth")) for p in mtimes}

    # An interrupted step 2 (no final checkpoint) is resumed from its last checkpoint.
    os.remove(os.path.join(out, "step2", "model_final.pth"))
    with open(os.path.join(out, "step2", "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    opts_longer = opts + ["SOLVER.MAX_ITER", "4"]
    run(["--two-step", "--resume", "--config-file", DEMO_YAML] + opts_longer)
    assert mtimes["step1"] == os.path.getmtime(os.path.join(out, "step1", "model_final.pth"))
    assert iteration_of(os.path.join(out, "step2", "model_final.pth")) == 3


def test_visualize(tmp_path, data_root):
    import cv2

    from harnet.engine.visualize_command import main as vis_main

    out = str(tmp_path / "run")
    run(["--config-file", DEMO_YAML] + tiny_opts(data_root, out, max_iter=1) + ["TEST.EVAL_PERIOD", "0"])
    vis = str(tmp_path / "vis")
    opts = tiny_opts(data_root, out)
    with no_own_warnings():
        assert vis_main(["--config-file", DEMO_YAML, "--dataset", "harnet_shapes_val", "--output",
                         vis, "--max-images", "2", "--score-thresh", "0.0"] + opts +
                        ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]) == 0
    files = sorted(os.listdir(vis))
    assert len(files) == 2 and all(f.endswith("_vis.png") for f in files), files
    pic = cv2.imread(os.path.join(vis, files[0]))
    # 64 px images drawn at 480 px: ground truth | 8 px | detections under 27 px title
    # bars; then 8 px and the image + 5 level masks in 2 rows of 3 (each 320 px + a
    # 22 px label bar, 4 px apart).
    assert pic.shape[:2] == (27 + 480 + 8 + 2 * (320 + 22) + 4, 2 * 480 + 8), pic.shape


def write_coco_dataset(folder, num_images, seed):
    """A tiny learnable COCO-format dataset: filled rectangles of 2 classes (ids 3 and 7:
    not contiguous) on dark noise, 80x64 px."""
    rng = np.random.RandomState(seed)
    images = []
    for i in range(num_images):
        img = rng.randint(0, 80, (64, 80, 3)).astype(np.uint8)
        boxes = []
        for _ in range(2):
            w, h = rng.randint(10, 30, 2)
            x, y = rng.randint(0, 80 - w), rng.randint(0, 64 - h)
            cat = int(rng.randint(2))
            img[y:y + h, x:x + w] = (255, 255, 255) if cat == 0 else (255, 200, 0)  # RGB
            boxes.append(((int(x), int(y), int(w), int(h)), [3, 7][cat]))
        images.append((f"img{i}.png", img, boxes))
    return write_coco(folder, images, [(3, "white"), (7, "orange")], json_name="instances.json")


def test_register_coco_format_from_command_line(tmp_path, data_root):
    train_json, train_images = write_coco_dataset(str(tmp_path / "train"), 3, seed=0)
    val_json, val_images = write_coco_dataset(str(tmp_path / "val"), 2, seed=1)
    out = str(tmp_path / "run")
    res = run(
        ["--config-file", DEMO_YAML,
         "--register-coco", "test_coco_train", train_json, train_images,
         "--register-coco", "test_coco_val", val_json, val_images]
        + tiny_opts(data_root, out, max_iter=2)
        + ["DATASETS.TRAIN", "('test_coco_train',)", "DATASETS.TEST", "('test_coco_val',)",
           "MODEL.RETINANET.NUM_CLASSES", "2"]
    )
    assert BBOX_KEYS <= set(res["bbox"])
    # The evaluation used the JSON's own category ids (3 and 7), i.e. that dataset.
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        assert {d["category_id"] for d in json.load(f)} <= {3, 7}
    # A path that does not exist is an error naming it.
    with pytest.raises(FileNotFoundError, match="nope.json"):
        run(["--config-file", DEMO_YAML, "--register-coco", "test_coco_bad",
             str(tmp_path / "nope.json"), train_images] + tiny_opts(data_root, out))


def test_eval_only_of_a_model_zoo_detector_with_harnet_postprocessing(tmp_path, data_root):
    # Detectron2's own RetinaNet from its model-zoo name, random weights, on the shapes val
    # set: MODEL.HARNET.POSTPROCESS keys on the command line change its detections.
    def detections(name, *keys):
        d = str(tmp_path / name)
        res = run(["--eval-only", "--config-file", "COCO-Detection/retinanet_R_50_FPN_1x.yaml"]
                  + tiny_opts(data_root, d) + [
                      "MODEL.WEIGHTS", "", "SEED", "1", "MODEL.RETINANET.NUM_CLASSES", "3",
                      "DATASETS.TRAIN", "('harnet_shapes_train',)",
                      "DATASETS.TEST", "('harnet_shapes_val',)", *keys])  # fmt: skip
        check_bbox_metrics(res)
        with open(os.path.join(d, "log.txt")) as f:
            installed = "HAR-Net post-processing (MODEL.HARNET.POSTPROCESS)" in f.read()
        with open(os.path.join(d, "inference", "coco_instances_results.json")) as f:
            return json.load(f), installed

    plain, plain_installed = detections("plain")
    soft, soft_installed = detections(
        "soft", "MODEL.HARNET.POSTPROCESS.NMS_TYPE", "gaussian",
        "MODEL.HARNET.POSTPROCESS.VOTING.ENABLED", "True",
    )  # fmt: skip
    assert not plain_installed and soft_installed
    assert plain != soft and len(soft) > 0


def test_eval_only_tta_of_a_model_zoo_rcnn_with_harnet_voting(tmp_path, data_root):
    # Detectron2's Faster R-CNN from its model-zoo name, random weights: TEST.AUG with
    # HAR-Net's soft-NMS + voting evaluates through GeneralizedRCNNWithHARNetTTA.
    d = str(tmp_path / "rcnn")
    res = run(["--eval-only", "--config-file", "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"]
              + tiny_opts(data_root, d) + [
                  "MODEL.WEIGHTS", "", "SEED", "1", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
                  "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                  "DATASETS.TRAIN", "('harnet_shapes_train',)",
                  "DATASETS.TEST", "('harnet_shapes_val',)",
                  "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64, 96)",
                  "TEST.AUG.MAX_SIZE", "96", "TEST.AUG.FLIP", "True",
                  "MODEL.HARNET.POSTPROCESS.NMS_TYPE", "gaussian",
                  "MODEL.HARNET.POSTPROCESS.VOTING.ENABLED", "True"])  # fmt: skip
    check_bbox_metrics(res)
    check_bbox_metrics(res, "harnet_shapes_val_TTA")
    with open(os.path.join(d, "inference_TTA", "coco_instances_results.json")) as f:
        tta = json.load(f)
    with open(os.path.join(d, "inference", "coco_instances_results.json")) as f:
        assert len(tta) > 0 and tta != json.load(f)


def test_lazy_model_zoo_detector_takes_harnet_postprocess_keys(tmp_path, data_root):
    # Detectron2's RetinaNet LazyConfig by its model-zoo name: harnet.postprocess.* on the
    # command line (same keywords and defaults as HARRetinaNet's postprocess_params).
    register_shapes("test_lazy_zoo_val", data_root, seed=7, num_images=2,
                    image_size=(64, 64), object_size=(8.0, 40.0))  # fmt: skip

    def detections(name, *keys):
        out = str(tmp_path / name)
        res = run(["--eval-only", "--config-file", "COCO-Detection/retinanet_R_50_FPN_1x.py",
                   f"train.output_dir={out}", "train.init_checkpoint=", "train.device=cpu",
                   "model.num_classes=3", "model.test_score_thresh=0.0",
                   "dataloader.test.dataset.names=test_lazy_zoo_val",
                   "dataloader.test.num_workers=0", f"dataloader.evaluator.output_dir={out}",
                   "dataloader.test.mapper.augmentations.0.short_edge_length=64",
                   "dataloader.test.mapper.augmentations.0.max_size=64", *keys])  # fmt: skip
        assert BBOX_KEYS <= set(res["test_lazy_zoo_val"]["bbox"])
        assert ("harnet.tta.enabled=True" in keys) == ("test_lazy_zoo_val_TTA" in res)
        with open(os.path.join(out, "log.txt")) as f:
            installed = "HAR-Net post-processing (harnet.postprocess)" in f.read()
        with open(os.path.join(out, "coco_instances_results.json")) as f:
            return json.load(f), installed

    plain, plain_installed = detections("plain")
    soft, soft_installed = detections(
        "soft", "harnet.postprocess.nms_type=gaussian", "harnet.postprocess.voting=True",
        "harnet.tta.enabled=True", "harnet.tta.min_sizes=[64,96]", "harnet.tta.max_size=96",
    )  # fmt: skip
    assert not plain_installed and soft_installed
    assert plain != soft and len(soft) > 0
    with open(tmp_path / "soft" / "inference_TTA" / "coco_instances_results.json") as f:
        assert json.load(f) != soft
    for bad, error, match in [
        (["harnet.postprocess.sigma=0.3"], KeyError, "has no key .harnet.postprocess.sigma"),
        (["harnet.postprocess.nms_type=soft"], ValueError, "harnet.postprocess: nms_type"),
        (["harnet.tta.enabled=True", "harnet.tta.merge=vote"], ValueError,
         r"harnet.tta \(TEST.AUG in lower case\): cfg.TEST.AUG.MERGE"),
    ]:  # fmt: skip
        with pytest.raises(error, match=match):
            detections("bad", *bad)


def test_unknown_config_file_names_the_model_zoo(tmp_path):
    args = argument_parser().parse_args(["--config-file", "COCO-Detection/nope.yaml"])
    with pytest.raises(FileNotFoundError, match="model-zoo config name"):
        build_config(args)
