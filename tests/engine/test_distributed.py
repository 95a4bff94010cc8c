"""Multi-process training on the CPU (gloo, harnet.engine.launch_cpu).

Equivalence: 2 processes with 1 image each must give the first iteration's loss and
(DDP-averaged) gradients of 1 process with both images. For that to hold exactly:

- per-image normalisation only: GroupNorm backbone (the demo config's BatchNorm is
  switched to GN here), CLGN towers (statistics per image);
- the same normaliser of the focal/box losses. Detectron2's RetinaNet divides each
  worker's loss by its own EMA of the number of positive anchors, initialised at 100 and
  not synchronised across workers, so per-worker losses are *not* those of the big batch.
  The model below all-reduces that count and scales the EMA's initial value by
  1/world_size: then every worker divides by (single-process normaliser) / world_size and
  DDP's gradient averaging yields exactly the single-process gradient.
"""
from harnet_model_utils import REPO
import os

import pytest
import torch
import torch.distributed as dist

import harnet  # noqa: F401
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from harnet.data import register_shapes_from_cfg
from harnet.engine import HARNetTrainer, argument_parser, launch_cpu, launch_from_args, main
from harnet.modeling import HARRetinaNet

ROOT = REPO
DEMO_YAML = os.path.join(ROOT, "configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")


@META_ARCH_REGISTRY.register()
class HARRetinaNetSyncedNormalizer(HARRetinaNet):
    """HARRetinaNet whose loss normaliser is the same function of the whole (distributed)
    batch as in a single process (see the module docstring)."""

    def _ema_update(self, name, value, initial_value, momentum=0.9):
        world = comm.get_world_size()
        if name == "loss_normalizer" and world > 1:
            t = torch.tensor([float(value)], dtype=torch.float64)
            dist.all_reduce(t)
            value, initial_value = t.item() / world, initial_value / world
        return super()._ema_update(name, value, initial_value, momentum)


def tiny_opts(data_root, out, total_batch):
    return [
        "OUTPUT_DIR", out,
        "DATASETS.SHAPES.ROOT", data_root,
        "DATASETS.SHAPES.NUM_TRAIN", "2",
        "DATASETS.SHAPES.NUM_VAL", "2",
        "DATASETS.SHAPES.IMAGE_SIZE", "(64, 64)",
        "DATASETS.SHAPES.OBJECT_SIZE", "(8.0, 40.0)",
        "DATASETS.SHAPES.OBJECTS_PER_IMAGE", "(2, 4)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "INPUT.RANDOM_FLIP", "none",
        "SOLVER.IMS_PER_BATCH", str(total_batch),
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "20",
    ]


def build_cfg(opts):
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(DEMO_YAML)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(opts))  # gloo: CPU processes
    cfg.freeze()
    register_shapes_from_cfg(cfg)
    return cfg


class _Capture(HookBase):
    """After the first step: the (DDP-averaged) gradients and the logged losses."""

    def __init__(self, path):
        self.path = path

    def after_step(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        storage = self.trainer.storage
        if comm.is_main_process():
            torch.save(
                {
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                    "num_params": sum(1 for _ in model.parameters()),
                    # SimpleTrainer logs each loss averaged over the workers.
                    "losses": {k: v.latest() for k, v in storage.histories().items() if "loss" in k},
                    "world": comm.get_world_size(),
                    "local": (comm.get_local_rank(), comm.get_local_size()),
                },
                self.path,
            )


def first_iteration(opts, path):
    """One training iteration (lr 0) with HARNetTrainer; runs in every worker."""
    torch.manual_seed(0)  # the same initial weights in every run (DDP also broadcasts rank 0's)
    cfg = build_cfg(opts)
    trainer = HARNetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_Capture(path)])
    trainer.train()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    # Generate the images once, before the workers start.
    cfg = build_cfg(tiny_opts(root, "unused", 2))
    DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    DatasetCatalog.get(cfg.DATASETS.TEST[0])
    return root


def test_two_processes_equal_one_process_with_both_images(tmp_path, data_root):
    common = [
        "MODEL.META_ARCHITECTURE", "HARRetinaNetSyncedNormalizer",
        # The demo's BatchNorm normalises over the (per-process) batch; GroupNorm per image.
        "MODEL.RESNETS.NORM", "GN",
        "SOLVER.MAX_ITER", "1",
        "SOLVER.BASE_LR", "0.0",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "DATASETS.TEST", "()",
    ]
    one = str(tmp_path / "one.pth")
    two = str(tmp_path / "two.pth")
    launch_cpu(first_iteration, 1, args=(tiny_opts(data_root, str(tmp_path / "o1"), 2) + common, one))
    launch_cpu(first_iteration, 2, dist_url="auto",
               args=(tiny_opts(data_root, str(tmp_path / "o2"), 2) + common, two))
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert a["world"] == 1 and b["world"] == 2
    assert b["local"] == (0, 2)  # the per-machine process group is set up as launch() does
    assert set(a["losses"]) == set(b["losses"]) and "loss_cls_channel" in a["losses"]
    for k in a["losses"]:
        assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-5), k
    # Every parameter got a gradient, in both runs, and they agree.
    assert len(a["grads"]) == len(b["grads"]) == a["num_params"]
    total = torch.cat([g.flatten() for g in a["grads"].values()])
    assert total.abs().max() > 0
    for n, g in a["grads"].items():
        torch.testing.assert_close(b["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_train_net_cpu_procs(tmp_path, data_root):
    # train_net.py's own path: --cpu-procs 2 spawns gloo workers that train, checkpoint
    # (rank 0) and evaluate with the results gathered from both workers.
    out = str(tmp_path / "run")
    args = argument_parser().parse_args(
        ["--cpu-procs", "2", "--dist-url", "auto", "--config-file", DEMO_YAML]
        + tiny_opts(data_root, out, 2) + ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1000"]
    )
    launch_from_args(main, args)
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    ckpt = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert ckpt["iteration"] == 1
    # No "module." prefix: the checkpointer saves the model inside DDP.
    assert not any(k.startswith("module.") for k in ckpt["model"])
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "World size: 2" in log
    # The evaluation saw both validation images (one per worker, gathered on rank 0).
    assert "Start inference on 1 batches" in log and "AP,AP50,AP75,APs,APm,APl" in log


def test_resume_on_two_processes_equals_uninterrupted(tmp_path, data_root):
    # Each process keeps its own running loss normaliser; the checkpoint (written by rank
    # 0) holds both, so that resuming from it on 2 processes continues the uninterrupted run
    # exactly. (The resumed run starts from the straight run's own checkpoint: a kill right
    # after writing it leaves the same file.)
    import shutil

    def run(out, resume):
        opts = tiny_opts(data_root, out, 2) + [
            "DATASETS.SHAPES.NUM_TRAIN", "6", "SOLVER.MAX_ITER", "6",
            "SOLVER.CHECKPOINT_PERIOD", "3", "SEED", "5", "TEST.EVAL_PERIOD", "0",
        ]  # fmt: skip
        argv = ["--cpu-procs", "2", "--dist-url", "auto", "--config-file", DEMO_YAML]
        launch_from_args(main, argument_parser().parse_args(argv + ["--resume"] * resume + opts))

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(straight, False)
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "model_0000002.pth"), resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    run(resumed, True)

    def load(folder, name="model_final.pth"):
        return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)

    mid = load(straight, "model_0000002.pth")["trainer"]
    normalizers = mid["loss_normalizers"]
    assert len(normalizers) == 2 and normalizers[0] == mid["loss_normalizer"]
    assert normalizers[0] != normalizers[1]  # the ranks saw different images
    a, b = load(straight), load(resumed)
    assert a["iteration"] == b["iteration"] == 5
    diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max())
               for k in a["model"])
    assert diff == 0.0, f"max weight difference {diff}"
