"""The fixed-shape suppression loops of the ONNX export (harnet.layers.suppress_loop):
run eagerly, the detections of suppress_detections_scriptable (soft-NMS: bit for bit;
voting: up to the rounding of its sums); exported (torch.export -> ONNX Loop) and run by
onnxruntime on inputs of other sizes than the example, none included."""

import pytest
import torch

from harnet.layers.postprocess import suppress_detections_scriptable, suppression_args
from harnet.layers.suppress_loop import suppress_detections_loop
from test_postprocess import _candidates

OPTIONS = [
    dict(nms_type="hard"),
    dict(nms_type="linear", iou_threshold=0.3),
    dict(nms_type="gaussian", soft_nms_sigma=0.5),
    dict(nms_type="gaussian", soft_nms_min_score=0.0),  # zero scores: kept, last
    dict(nms_type="linear", soft_nms_min_score=0.0),
    dict(nms_type="gaussian", voting=True, voting_scoring="unclaimed_top4"),
    dict(nms_type="hard", voting=True, voting_scoring="max"),
    dict(nms_type="linear", voting=True, voting_scoring="avg"),
    dict(nms_type="gaussian", voting=True, voting_scoring="keep", min_score=0.3),
]


def _inputs(n, seed):
    boxes, scores, classes = _candidates(max(n, 8), seed=seed)
    boxes, scores, classes = boxes[:n], scores[:n], classes[:n]
    if n > 20:
        boxes[7], classes[7] = boxes[3], classes[3]  # an exact copy (IoU 1)
        scores[9] = scores[4]  # a tie
        scores[11] = 0.0
    return boxes, scores, classes


def _tie_order(boxes, scores, classes):
    """Detections by decreasing score, ties by class then x1: torchvision's hard NMS orders
    tied scores its own way, the loop by index."""
    order = torch.sort(boxes[:, 0], stable=True)[1]
    order = order[torch.sort(classes[order], stable=True)[1]]
    order = order[torch.sort(scores[order], descending=True, stable=True)[1]]
    return boxes[order], scores[order], classes[order]


def _assert_equal(got, want, options):
    """Soft-NMS: bit for bit, in order. Voting sums in another order: equal up to rounding."""
    if options["nms_type"] == "hard":
        got, want = _tie_order(*got), _tie_order(*want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
    if options.get("voting"):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
        assert torch.equal(got[2], want[2])
    else:
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("n", [0, 1, 3, 300])
def test_eager_loop_gives_the_pytorch_suppression(options, n):
    args = suppression_args(max_detections=100, **options)
    for seed in range(2):
        boxes, scores, classes = _inputs(n, seed)
        _assert_equal(
            suppress_detections_loop(boxes, scores, classes, *args),
            suppress_detections_scriptable(boxes, scores, classes, *args),
            options,
        )


def test_non_finite_candidates_are_dropped_on_every_path():
    boxes, scores, classes = _inputs(300, 0)
    finite = torch.ones(300, dtype=torch.bool)
    finite[[5, 50, 150]] = False
    boxes[5, 2], scores[50], boxes[150, 0] = float("nan"), float("inf"), float("-inf")
    for options in OPTIONS:
        args = suppression_args(max_detections=100, **options)
        got = suppress_detections_loop(boxes, scores, classes, *args)
        want = suppress_detections_scriptable(boxes[finite], scores[finite], classes[finite], *args)
        _assert_equal(got, want, options)


class _Suppress(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, boxes, scores, classes):
        return suppress_detections_loop(boxes, scores, classes, *self.args)


# Hard NMS with "max" voting: the hard decay and the voting loop; Gaussian with the
# authors' voting: the log-space decay and the owner loop.
@pytest.mark.parametrize("options", [OPTIONS[6], OPTIONS[5]], ids=["hard-max", "gaussian-caffe"])
def test_onnx_loops_give_the_eager_detections_on_other_sizes(options, tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    from harnet.export import _onnx_stable_sort

    args = suppression_args(max_detections=60, **options)
    n = torch.export.Dim("n", min=0, max=100000)
    with torch.no_grad():
        program = torch.export.export(
            _Suppress(args), _inputs(120, 0), dynamic_shapes=({0: n}, {0: n}, {0: n})
        )
        torch.onnx.export(
            program, dynamo=True, custom_translation_table={
                torch.ops.aten.sort.stable: _onnx_stable_sort
            },
        ).save(str(tmp_path / "suppress.onnx"))  # fmt: skip
    session = onnxruntime.InferenceSession(str(tmp_path / "suppress.onnx"))
    names = [i.name for i in session.get_inputs()]
    for count in (0, 1, 300):
        inputs = _inputs(count, 1)
        got = session.run(None, {k: v.numpy() for k, v in zip(names, inputs)})
        want = suppress_detections_scriptable(*inputs, *args)
        assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
        torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got[1]), want[1], rtol=0, atol=1e-6)
        assert torch.equal(torch.from_numpy(got[2]), want[2])
