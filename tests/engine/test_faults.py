"""Training faults: non-finite losses and weights, a process killed while writing a
checkpoint, resuming, and safe checkpoint loading.

References: Detectron2's own behaviour (SimpleTrainer's NaN check, fvcore's in-place
checkpoint writes) and an uninterrupted run of the same trainer."""
import inspect
import multiprocessing as mp
import os
import pickle

import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import HookBase
from detectron2.engine.train_loop import SimpleTrainer
from detectron2.utils.events import EventStorage

from harnet.engine import HARNetTrainer
from harnet.engine.faults import (
    AtomicDetectionCheckpointer,
    CorruptCheckpointError,
    GuardedSimpleTrainer,
    check_finite_losses,
)
from harnet_model_utils import tiny_cfg, write_coco_dataset

# Children are forked (no re-import: fast). A forked child must not enter an OpenMP
# parallel region the parent used (libgomp hangs), hence set_num_threads(1) first thing.
_FORK = mp.get_context("fork")


# ---------------------------------------------------------------- non-finite losses


def test_detectron2_nan_check_names_iteration_only_on_total():
    # What Detectron2 already does: the iteration and every term's value, no term named.
    # Detectron2 0.6: write_metrics(loss_dict, data_time, prefix) takes the iteration from
    # the event storage; upstream (2023+) takes it as an argument, cur_iter.
    losses = {"loss_cls": torch.tensor(float("nan")), "loss_box_reg": torch.tensor(0.5)}
    takes_iter = "cur_iter" in inspect.signature(SimpleTrainer.write_metrics).parameters
    with EventStorage(7):
        with pytest.raises(FloatingPointError, match="iteration=7"):
            if takes_iter:
                SimpleTrainer.write_metrics(losses, 0.0, 7)
            else:
                SimpleTrainer.write_metrics(losses, 0.0)


class _LossModel(nn.Module):
    """Returns two loss terms; ``loss_b`` is NaN at iteration ``nan_at`` (counted calls)."""

    def __init__(self, nan_at):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, batch):
        loss_b = (self.w * 2).sum()
        if self.calls == self.nan_at:
            loss_b = loss_b * float("nan")
        self.calls += 1
        return {"loss_a": self.w.square().sum(), "loss_b": loss_b}


def _async_supported():
    return "async_write_metrics" in inspect.signature(SimpleTrainer.__init__).parameters


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async"])
def test_nan_loss_stops_before_the_step_with_sync_and_async_metrics(async_write):
    if async_write and not _async_supported():
        pytest.skip("Detectron2 0.6's SimpleTrainer writes metrics synchronously only "
                    "(async_write_metrics was added upstream in 2023)")
    model = _LossModel(nan_at=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"async_write_metrics": True} if async_write else {}
    trainer = GuardedSimpleTrainer(model, iter(lambda: [None], 0), opt, **kwargs)
    after_two_steps = None

    class Snapshot(HookBase):
        def after_step(self):
            nonlocal after_two_steps
            if self.trainer.iter == 1:
                after_two_steps = model.w.detach().clone()

    trainer.register_hooks([Snapshot()])
    with pytest.raises(FloatingPointError, match=r"iteration=2: loss_b=nan \(all terms"):
        trainer.train(0, 5)
    assert model.calls == 3
    # No optimizer step ran at the failing iteration: the weights are still finite and
    # equal to those after iteration 1.
    torch.testing.assert_close(model.w.detach(), after_two_steps)


def test_check_finite_losses_names_terms():
    losses = {"loss_cls": torch.tensor(float("inf")), "loss_box_reg": torch.tensor(0.5),
              "loss_cls_b": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match=r"iteration=12: loss_cls=inf, loss_cls_b=nan \("):
        check_finite_losses(losses, 12)
    check_finite_losses({"loss": torch.tensor(1.0)}, 0)  # finite: no error


# ---------------------------------------------------------------- atomic checkpoints


def _tiny_module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _die_while_saving(checkpointer_cls, folder, name):
    """Child process: torch.save writes half of the bytes, then the process dies."""
    torch.set_num_threads(1)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os._exit(17)

    torch.save = half_save
    model = _tiny_module()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # different weights from the saved ones
    checkpointer_cls(model, folder).save(name)


def _kill_during_save(checkpointer_cls, folder, name):
    p = _FORK.Process(target=_die_while_saving, args=(checkpointer_cls, folder, name))
    p.start()
    p.join(60)
    assert p.exitcode == 17


@pytest.mark.parametrize("second_name", ["model_final", "model_0000009"])
def test_killed_while_saving_keeps_previous_checkpoint(tmp_path, second_name):
    folder = str(tmp_path)
    model = _tiny_module()
    AtomicDetectionCheckpointer(model, folder).save("model_final", iteration=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _kill_during_save(AtomicDetectionCheckpointer, folder, second_name)

    if second_name != "model_final":
        assert not os.path.exists(os.path.join(folder, second_name + ".pth"))
    fresh = _tiny_module()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    ckpt = AtomicDetectionCheckpointer(fresh, folder)
    assert ckpt.get_checkpoint_file() == os.path.join(folder, "model_final.pth")
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 4
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # Only the previous checkpoint is a checkpoint; the partial write is a hidden temp file.
    assert ckpt.get_all_checkpoint_files() == [os.path.join(folder, "model_final.pth")]


def test_detectron2_checkpointer_killed_while_saving_is_not_resumable(tmp_path):
    # The reference: fvcore writes in place, so re-saving a name corrupts the only copy.
    folder = str(tmp_path)
    DetectionCheckpointer(_tiny_module(), folder).save("model_final", iteration=4)
    _kill_during_save(DetectionCheckpointer, folder, "model_final")
    with pytest.raises(Exception):
        DetectionCheckpointer(_tiny_module(), folder).resume_or_load("", resume=True)
    # ... and our loader names the file when asked to read such a file.
    with pytest.raises(CorruptCheckpointError, match="model_final.pth.*truncated or corrupt"):
        AtomicDetectionCheckpointer(_tiny_module(), folder).resume_or_load("", resume=True)


def test_failed_save_leaves_no_file(tmp_path):
    class Unsavable:
        def state_dict(self):
            return {"x": lambda: 0}  # torch.save cannot pickle a lambda

    ckpt = AtomicDetectionCheckpointer(_tiny_module(), str(tmp_path), extra=Unsavable())
    with pytest.raises(Exception):
        ckpt.save("model_0000001")
    assert os.listdir(tmp_path) == []


def test_non_finite_weights_are_not_saved(tmp_path):
    model = _tiny_module()
    ckpt = AtomicDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model_0000002.*2\.weight.*model_0000001\.pth"):
        ckpt.save("model_0000002")
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


# ---------------------------------------------------------------- safe loading


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs at unpickling time


def test_pth_with_code_is_rejected_without_running_it(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pth")
    torch.save({"model": _tiny_module().state_dict(), "x": _Payload(marker)}, path)
    with pytest.raises(CorruptCheckpointError, match="evil.pth.*weights_only=True"):
        AtomicDetectionCheckpointer(_tiny_module()).load(path)
    assert not os.path.exists(marker)


def test_truncated_pth_error_names_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": _tiny_module().state_dict()}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="cut.pth"):
        AtomicDetectionCheckpointer(_tiny_module()).load(str(path))


def test_bare_state_dict_and_pkl_still_load(tmp_path):
    sd = _tiny_module().state_dict()
    torch.save(sd, str(tmp_path / "bare.pth"))
    with open(tmp_path / "zoo.pkl", "wb") as f:  # Detectron2 model-zoo layout (numpy)
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "test"}, f)
    for name in ("bare.pth", "zoo.pkl"):
        m = _tiny_module()
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()
        AtomicDetectionCheckpointer(m).load(str(tmp_path / name))
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, sd[k])


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults_data"))
    json_file, image_root = write_coco_dataset(root, n_images=2)
    name = "harnet_test_faults_train"
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)
    return name


def _trainer_cfg(dataset, out, max_iter=4):
    cfg = tiny_cfg("HARRetinaNet")
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = out
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.SOLVER.STEPS = (3,)  # the lr drops after the interruption
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.BASE_LR = 0.005
    cfg.SEED = 1
    cfg.MODEL.BACKBONE.FREEZE_AT = 5  # a frozen ResNet: speed (the attention modules train)
    cfg.freeze()
    return cfg


def _trainer(cfg, resume):
    torch.manual_seed(0)
    trainer = HARNetTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


class _NaNLossAt(HookBase):
    """Makes loss_cls NaN from iteration ``at`` on (a forward hook on the model)."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            def nan_cls(module, inputs, losses):
                return dict(losses, loss_cls=losses["loss_cls"] * float("nan"))

            # prepend: like a loss term turning NaN inside the model, i.e. before the
            # trainer's own check (also a forward hook) sees the losses.
            self.trainer.model.register_forward_hook(nan_cls, prepend=True)


def _state(trainer):
    return {
        "iter": trainer.iter,
        "lrs": [g["lr"] for g in trainer.optimizer.param_groups],
        "sched": trainer.scheduler.last_epoch,
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
    }


def test_nan_loss_stops_and_resume_matches_uninterrupted_run(tmp_path, dataset):
    full = _trainer(_trainer_cfg(dataset, str(tmp_path / "full")), resume=False)
    assert isinstance(full.checkpointer, AtomicDetectionCheckpointer)
    assert isinstance(full._trainer, GuardedSimpleTrainer)
    full.train()
    ref = _state(full)
    assert ref["iter"] == 4

    cfg = _trainer_cfg(dataset, str(tmp_path / "crash"))
    crashed = _trainer(cfg, resume=False)
    crashed.register_hooks([_NaNLossAt(2)])
    with pytest.raises(FloatingPointError, match=r"iteration=2: loss_cls=nan"):
        crashed.train()
    last = crashed.checkpointer.get_checkpoint_file()
    assert last.endswith("model_0000001.pth")
    # The checkpoint is complete: it loads with weights_only and its weights are finite.
    data = torch.load(last, weights_only=True)
    assert data["iteration"] == 1 and data["trainer"]["iteration"] == 1
    assert data["trainer"]["_trainer"]["optimizer"]["state"]  # momentum buffers
    assert data["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2
    assert all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())

    resumed = _trainer(cfg, resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    got = _state(resumed)
    assert got["iter"] == ref["iter"] and got["sched"] == ref["sched"]
    assert got["lrs"] == pytest.approx(ref["lrs"], rel=1e-12)
    assert len(set(ref["lrs"])) > 1  # the offset conv's own lr group is compared too
    for k, v in ref["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def _train_and_die_on_second_save(cfg):
    torch.set_num_threads(1)
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x00" * 1000)  # part of the file
            f.flush()
            os._exit(17)
        real_save(obj, f, *args, **kwargs)

    torch.save = save
    _trainer(cfg, resume=False).train()
    os._exit(0)


def test_killed_during_checkpoint_then_resume_flag(tmp_path, dataset):
    from harnet.engine import argument_parser, main

    out = str(tmp_path / "killed")
    cfg = _trainer_cfg(dataset, out, max_iter=5)
    p = _FORK.Process(target=_train_and_die_on_second_save, args=(cfg,))
    p.start()
    p.join(300)
    assert p.exitcode == 17
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000001.pth"
    assert not os.path.exists(os.path.join(out, "model_0000003.pth"))

    cfg_file = str(tmp_path / "cfg.yaml")
    with open(cfg_file, "w") as f:
        f.write(cfg.dump())
    args = argument_parser().parse_args(["--config-file", cfg_file, "--resume"])
    torch.manual_seed(0)
    main(args)
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_final.pth"
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert final["iteration"] == 4
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "Starting training from iteration 2" in log


# ---------------------------------------------------------------- diverged features


def _forward_with_non_finite_features(queue):
    """Child: features turn NaN before the aligned attention (a diverged backbone)."""
    torch.set_num_threads(1)
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    model = build_model(tiny_cfg("HARRetinaNet"))
    model.train()
    with torch.no_grad():
        model.backbone.bottom_up.res4[0].conv1.weight.fill_(float("nan"))
    inputs = [{"image": torch.rand(3, 64, 64) * 255,
               "instances": Instances((64, 64), gt_boxes=Boxes(torch.tensor([[1.0, 1, 20, 20]])),
                                      gt_classes=torch.tensor([0]))}]
    try:
        with EventStorage(5):
            check_finite_losses(model(inputs), 5)
        queue.put("no error")
    except FloatingPointError as e:
        queue.put(str(e))


def test_diverged_features_stop_training_instead_of_crashing():
    # The trainer's non-finite loss check can only report a diverged model if the forward
    # pass returns: NaN features reaching the deformable conv must not kill the process.
    queue = _FORK.Queue()
    child = _FORK.Process(target=_forward_with_non_finite_features, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"the forward pass crashed the process (exit code {child.exitcode})"
    assert "iteration=5" in queue.get(timeout=5)
