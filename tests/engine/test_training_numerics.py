"""A training step's gradients do not depend on how often the process has run one before.

A resumed run starts in a fresh process, so its first steps must compute what the
uninterrupted run's later steps compute. TorchScript's profiling executor re-optimises a
scripted function after its first calls (symbolic autodiff); fvcore's scripted
``sigmoid_focal_loss_jit``, which Detectron2's ``RetinaNet.losses`` calls, then returns a
gradient that differs in the last bits from its first call's.
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from harnet_model_utils import har_cfg, make_inputs


@pytest.mark.parametrize("normalizer", ["per_level"])  # "running" keeps state between calls:
def test_harnet_gradients_equal_on_every_call(normalizer):  # covered by test_resume's slow test
    torch.manual_seed(0)
    cfg = har_cfg()
    cfg.MODEL.HARNET.LOSS.NORMALIZER = normalizer
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).train()
    inputs = make_inputs(sizes=((64, 80), (48, 64)))
    grads = []
    for _ in range(3):
        model.zero_grad()
        with EventStorage():
            losses = model([dict(d) for d in inputs])
        sum(losses.values()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))
