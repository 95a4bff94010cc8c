"""Export a HARRetinaNet for deployment: the whole detector as traced TorchScript, scripted
TorchScript, a ``torch.export`` program or ONNX; or the network alone as ONNX.

TorchScript (:func:`export_torchscript`): the detector is traced with Detectron2's
``TracingAdapter`` (the convention of Detectron2's ``tools/deploy/export_model.py``). Tracing
records tensor ops for the example image only, so a data-dependent loop (soft-NMS's greedy
steps, box voting's blocks) would be unrolled for that image and break on others. HARNet's
post-processing is therefore called through its TorchScript-compiled version while tracing
(:func:`harnet.layers.postprocess.suppress_detections` does this under ``torch.jit.trace``):
the trace records a call to the scripted function, whose loops run for each image. The
exported module takes one image ``Tensor[3, H, W]`` (the model's input format, already
resized, any H and W) and returns ``(boxes Tensor[K, 4], classes Tensor[K] int64,
scores Tensor[K])`` in the input image's pixels: Detectron2's flattened ``Instances``
(fields in name order: pred_boxes, pred_classes, scores).

Scripting (:func:`script_detector`), ``torch.export`` (:func:`export_program`) and ONNX
(:func:`export_onnx`: standard ops, the suppression's greedy loops as ONNX ``Loop``) give
a module with the same contract: see their docs.

The network alone, image to head outputs, exports to ONNX with :func:`export_onnx_network`;
:func:`detections_from_head_outputs` is then the post-processing step, run by PyTorch.
"""

import contextlib
import inspect
import types
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = [
    "trace_detector",
    "export_torchscript",
    "script_detector",
    "export_scripting",
    "ExportableDetector",
    "export_program",
    "OnnxDetector",
    "export_onnx",
    "ONNX_OUTPUT_NAMES",
    "HeadOutputs",
    "export_onnx_network",
    "detections_from_head_outputs",
    "onnx_output_names",
]


def trace_detector(model: nn.Module, image: Tensor) -> torch.jit.ScriptModule:
    """Traces ``model`` (a Detectron2 dense detector in eval mode, e.g. HARRetinaNet) on
    ``image`` (``Tensor[3, H, W]``) with Detectron2's ``TracingAdapter``.

    Returns:
        ScriptModule: ``forward(image) -> (boxes, classes, scores)`` (see the module doc).
    """
    from detectron2.export import TracingAdapter

    if model.training:
        raise ValueError("trace_detector: the model must be in eval mode (model.eval())")
    adapter = _DetectionTensors(TracingAdapter(model, [{"image": image}]))
    with torch.no_grad(), _dynamic_candidate_count(model):
        # check_trace would re-run the trace and compare graphs, which differ only by the
        # scripted call's compilation: not a correctness check of the outputs.
        return torch.jit.trace(adapter, (image,), check_trace=False)


@contextlib.contextmanager
def _dynamic_candidate_count(model: nn.Module):
    """While tracing on a Detectron2 whose per-level decoding computes ``min(topk,
    count)`` in Python (0.6: the trace would keep the example image's count as a
    constant), decode with :func:`_decode_per_level_sliced` instead; a no-op elsewhere."""
    from detectron2.modeling.meta_arch.dense_detector import DenseDetector

    source = inspect.getsource(DenseDetector._decode_per_level_predictions)
    if "torch.clamp" in source or not isinstance(model, DenseDetector):
        yield
        return
    model._decode_per_level_predictions = types.MethodType(_decode_per_level_sliced, model)
    try:
        yield
    finally:
        del model._decode_per_level_predictions


def _decode_per_level_sliced(
    self, anchors, pred_scores: Tensor, pred_deltas: Tensor, score_thresh: float,
    topk_candidates: int, image_size: Tuple[int, int],
) -> Instances:  # fmt: skip
    """Detectron2 0.6's ``DenseDetector._decode_per_level_predictions`` (threshold, top-k
    by a descending sort, box decoding) with the top-k count left to slicing, which clamps
    at run time: the same results eagerly, and a trace that holds for any image."""
    keep = pred_scores > score_thresh
    scores, order = pred_scores[keep].sort(descending=True)
    candidates = torch.nonzero(keep)[order[:topk_candidates]]
    anchor_idxs, classes = candidates.unbind(dim=1)
    boxes = self.box2box_transform.apply_deltas(
        pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
    )
    return Instances(
        image_size, pred_boxes=Boxes(boxes), scores=scores[:topk_candidates], pred_classes=classes
    )


class _DetectionTensors(nn.Module):
    """``TracingAdapter``'s flat outputs as ``(boxes, classes, scores)``: the flattening
    differs between Detectron2 versions (0.6 adds the image size), the outputs do not."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        flat = self.adapter(image)
        instances = self.adapter.outputs_schema(flat)[0]["instances"]
        return instances.pred_boxes.tensor, instances.pred_classes, instances.scores


def export_torchscript(model: nn.Module, image: Tensor, path: str) -> torch.jit.ScriptModule:
    """:func:`trace_detector`, saved to ``path`` (load with ``torch.jit.load``; needs only
    torch and torchvision's ops, not Detectron2 or HARNet)."""
    traced = trace_detector(model, image)
    torch.jit.save(traced, path)
    return traced


class _FlatDetections(nn.Module):
    """``model([{"image": image}])``'s detections as ``(boxes, classes, scores)``: the
    contract of every export format (no Detectron2 structure crosses the boundary)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        instances = self.model([{"image": image}])[0]["instances"]
        return instances.pred_boxes.tensor, instances.pred_classes, instances.scores


def script_detector(model: nn.Module) -> torch.jit.ScriptModule:
    """Scripts ``model`` (a HARRetinaNet in eval mode; any post-processing) with
    Detectron2's ``scripting_with_instances``: the greedy loops of soft-NMS and voting are
    compiled, so the module holds for any image. ``model`` itself is left unchanged
    (:meth:`HARRetinaNet.__prepare_scriptable__` scripts a copy).

    Returns:
        ScriptModule: ``forward(image Tensor[3, H, W]) -> (boxes, classes, scores)`` as
        ``model([{"image": image}])`` gives them.
    """
    from detectron2.export import scripting_with_instances

    if model.training:
        raise ValueError("script_detector: the model must be in eval mode (model.eval())")
    fields = {"pred_boxes": Boxes, "scores": Tensor, "pred_classes": Tensor}
    with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return scripting_with_instances(_FlatDetections(model).eval(), fields)


def export_scripting(model: nn.Module, path: str) -> torch.jit.ScriptModule:
    """:func:`script_detector`, saved to ``path`` (``torch.jit.load``; torch and
    torchvision only)."""
    scripted = script_detector(model)
    torch.jit.save(scripted, path)
    return scripted


class ExportableDetector(nn.Module):
    """A HARRetinaNet's inference written for ``torch.export`` with symbolic image sizes:
    the same steps and detections as ``model([{"image": image}])``, with

    - the padding to ``size_divisibility`` as an explicit multiple (so the compiler can
      prove the FPN levels' sizes match);
    - anchors from integer grids (Detectron2's ``arange(start, end, step)`` has a
      float-rounded length, on which the export would specialise);
    - the suppression as one ``torch.ops.harnet.suppress_detections`` call.

    ``forward(image Tensor[3, H, W]) -> (boxes, classes, scores)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from detectron2.modeling.meta_arch.dense_detector import DenseDetector

        from .layers.postprocess import suppression_args

        if getattr(model, "candidate_mode", "detectron2") != "detectron2":
            raise ValueError(
                "torch.export / ONNX: MODEL.HARNET.CANDIDATES.MODE 'authors' does not export "
                "(it needs each image's original size); use 'detectron2', or --format scripting"
            )
        if getattr(model.backbone, "padding_constraints", {}).get("square_size", 0):
            raise ValueError("torch.export / ONNX: square padding (square_size) does not export")
        self.model = model
        self.suppression = suppression_args(**model.postprocess_params)
        # Tied scores keep Detectron2's order only with its own selection op.
        decode = inspect.getsource(DenseDetector._decode_per_level_predictions)
        self.select_by_topk = "pred_scores.topk(" in decode

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.model
        height, width = image.shape[1], image.shape[2]
        x = (image - m.pixel_mean) / m.pixel_std
        d = max(int(m.backbone.size_divisibility), 1)
        x = F.pad(x, (0, (width + d - 1) // d * d - width, 0, (height + d - 1) // d * d - height))
        features = m.backbone(x[None])
        features = [features[f] for f in m.head_in_features]
        logits, deltas = m._transpose_dense_predictions(m.head(features), [m.num_classes, 4])
        boxes, scores, classes = [], [], []
        for level, (feature, stride, cell) in enumerate(
            zip(features, m.anchor_generator.strides, m.anchor_generator.cell_anchors)
        ):
            anchors = _grid_anchors(feature, stride, cell, m.anchor_generator.offset)
            # This Detectron2's selection: threshold, then the first topk (ties in its order).
            level_scores = logits[level][0].sigmoid().flatten()
            keep = level_scores > m.test_score_thresh
            kept = level_scores[keep]
            if self.select_by_topk:  # Detectron2 main
                top, order = kept.topk(torch.sym_min(m.test_topk_candidates, kept.shape[0]))
            else:  # 0.6: a descending sort
                top, order = kept.sort(descending=True)
                top, order = top[: m.test_topk_candidates], order[: m.test_topk_candidates]
            index = torch.nonzero(keep).squeeze(1)[order]
            anchor = torch.div(index, m.num_classes, rounding_mode="floor")
            level_deltas = deltas[level][0][anchor]
            boxes.append(m.box2box_transform.apply_deltas(level_deltas, anchors[anchor]))
            scores.append(top)
            classes.append(index % m.num_classes)
        b, s, c = self._suppress(torch.cat(boxes), torch.cat(scores), torch.cat(classes))
        # detector_postprocess at the input's size: clip, drop empty boxes.
        b = torch.stack(
            [b[:, 0].clamp(0, width), b[:, 1].clamp(0, height),
             b[:, 2].clamp(0, width), b[:, 3].clamp(0, height)], dim=1,
        )  # fmt: skip
        nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        return b[nonempty], c[nonempty], s[nonempty]


    def _suppress(self, boxes: Tensor, scores: Tensor, classes: Tensor):
        return torch.ops.harnet.suppress_detections(boxes, scores, classes, *self.suppression)


def _grid_anchors(feature: Tensor, stride: int, cell: Tensor, offset: float) -> Tensor:
    """Detectron2's ``DefaultAnchorGenerator`` anchors of one level (``(y, x, cell)``
    order, ``(i + offset) * stride`` centres), from integer grids. The grids are added to
    zeros, not expanded (a meshgrid's expanded views need a size-1 test to flatten)."""
    h, w = feature.shape[-2], feature.shape[-1]
    xs = (torch.arange(w, device=feature.device, dtype=torch.float32) + offset) * stride
    ys = (torch.arange(h, device=feature.device, dtype=torch.float32) + offset) * stride
    grid_x = (xs[None, :] + xs.new_zeros(h, 1)).reshape(-1)
    grid_y = (ys[:, None] + ys.new_zeros(1, w)).reshape(-1)
    shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)


class OnnxDetector(ExportableDetector):
    """:class:`ExportableDetector` with the suppression in standard ops: the greedy loops of
    (soft-)NMS and box voting as ``while_loop`` loops over fixed-shape state
    (:mod:`harnet.layers.suppress_loop`), which ONNX runs as ``Loop`` nodes. The same
    detections as the model, up to the rounding of voting sums; non-finite candidates are
    dropped on every path, and ties keep index order."""

    def _suppress(self, boxes: Tensor, scores: Tensor, classes: Tensor):
        from .layers.suppress_loop import suppress_detections_loop

        return suppress_detections_loop(boxes, scores, classes, *self.suppression)


def _export_dynamic(
    module: ExportableDetector, image: Tensor, max_size: int, caller: str
) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``module`` on ``image`` with dynamic height and width: sides in
    ``[2, max_size]``, the longer one at least the coarsest stride + 1 (129 px for P3-P7).
    Below that the coarsest level has one location, on which convolution tests its memory
    format (a guard of the program)."""
    import torch.fx.experimental._config as fx_config

    model = module.model
    if model.training:
        raise ValueError(f"{caller}: the model must be in eval mode (model.eval())")
    longer = max(int(s) for s in model.anchor_generator.strides) + 1
    if min(image.shape[1:]) < 2 or max(image.shape[1:]) > max_size or (
        max(image.shape[1:]) < longer
    ):
        raise ValueError(
            f"{caller}: the example image is {tuple(image.shape[1:])}; its sides must be in "
            f"[2, {max_size}] and the longer one >= {longer} (the exported program's range)"
        )
    height = torch.export.Dim("height", min=2, max=max_size)
    width = torch.export.Dim("width", min=2, max=max_size)
    # Size-oblivious guards: a broadcast's size-1 test does not specialise the graph.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(
            module.eval(), (image,), dynamic_shapes={"image": {1: height, 2: width}}
        )


def export_program(
    model: nn.Module, image: Tensor, path: str, max_size: int = 4096
) -> "torch.export.ExportedProgram":
    """Exports :class:`ExportableDetector` of ``model`` with ``torch.export`` (dynamic
    height and width) and saves it to ``path`` (``.pt2``). Load it with ``import harnet``
    (registers the suppression op) and ``torch.export.load(path).module()``.

    Sides must lie in ``[2, max_size]``, the longer one at least the coarsest stride + 1
    (129 px for P3-P7; the program checks it). ``image`` (``Tensor[3, H, W]`` in that
    range) is the example.
    """
    program = _export_dynamic(ExportableDetector(model), image, max_size, "export_program")
    torch.export.save(program, path)
    return program


ONNX_OUTPUT_NAMES = ("boxes", "classes", "scores")


def export_onnx(
    model: nn.Module, image: Tensor, path: str, max_size: int = 4096, opset_version: int = 19
):
    """Exports the whole detector, :class:`OnnxDetector` of ``model``, to ONNX at ``path``
    with ``torch.onnx.export(..., dynamo=True)`` (needs the ``onnxscript`` package).

    The graph takes ``image`` ``[3, height, width]`` (dynamic, sizes as for
    :func:`export_program`, which onnxruntime does not check) and returns
    :data:`ONNX_OUTPUT_NAMES`: boxes ``[K, 4]`` float32, classes ``[K]`` int64, scores
    ``[K]`` float32, as the model's ``Instances``. Standard ops of opset 19 (``DeformConv``
    for aligned attention, ``Loop`` for the suppression): onnxruntime runs it.

    Returns:
        torch.onnx.ONNXProgram: the exported program (already saved).
    """
    if opset_version < 19:
        raise ValueError(
            f"export_onnx: HARNet's deformable convolution needs ONNX opset >= 19, got "
            f"{opset_version}"
        )
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise ValueError(
            "export_onnx: torch.onnx.export(dynamo=True) needs the onnxscript package "
            "(pip install onnxscript)"
        ) from e
    program = _export_dynamic(OnnxDetector(model), image, max_size, "export_onnx")
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset_version,
            input_names=["image"],
            output_names=list(ONNX_OUTPUT_NAMES),
            custom_translation_table={
                torch.ops.torchvision.deform_conv2d.default: _onnx_deform_conv2d,
                torch.ops.aten.sort.stable: _onnx_stable_sort,
            },
        )
    onnx_program.save(path)
    return onnx_program


def _onnx_stable_sort(x, stable=None, dim=-1, descending=False):
    """``torch.sort(x, dim, descending, stable=True)`` as ONNX ``TopK`` of all elements,
    which the ONNX spec makes stable (equal values: the lower index first)."""
    from onnxscript import opset19 as op

    count = op.Gather(op.Shape(x), op.Constant(value_ints=[dim]))
    values, indices = op.TopK(x, count, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def _onnx_deform_conv2d(x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                        dil_h, dil_w, groups, offset_groups, use_mask):  # fmt: skip
    """``torchvision::deform_conv2d`` as ONNX ``DeformConv`` (opset 19: the same offset
    layout, (y, x) pairs per kernel tap; the mask input only when used)."""
    from onnxscript import opset19 as op

    inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
    return op.DeformConv(
        *inputs,
        dilations=[dil_h, dil_w],
        group=groups,
        offset_group=offset_groups,
        pads=[pad_h, pad_w, pad_h, pad_w],
        strides=[stride_h, stride_w],
    )


class HeadOutputs(nn.Module):
    """The network of a RetinaNet-style detector: image ``Tensor[3, H, W]`` (model input
    format) to the head's outputs, as a flat tuple: per level (P3 first) the class logits
    ``Tensor[1, A * num_classes, H_l, W_l]``, then per level the box deltas
    ``Tensor[1, A * 4, H_l, W_l]`` (averaged over HARNet's predictors, as in inference)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        images = self.model.preprocess_image([{"image": image}])
        features = self.model.backbone(images.tensor)
        logits, deltas = self.model.head([features[f] for f in self.model.head_in_features])
        return tuple(logits) + tuple(deltas)


def onnx_output_names(num_levels: int) -> List[str]:
    """Output names of :func:`export_onnx_network`'s graph: ``logits_0..``, ``deltas_0..``."""
    return [f"logits_{i}" for i in range(num_levels)] + [f"deltas_{i}" for i in range(num_levels)]


def export_onnx_network(
    model: nn.Module, image: Tensor, path: str, opset_version: int = 19
) -> None:
    """Exports :class:`HeadOutputs` of ``model`` to ONNX at ``path`` (input ``image``
    ``[3, height, width]``, dynamic height and width; outputs :func:`onnx_output_names`).
    Opset 19 has ``DeformConv`` (HARNet's aligned attention)."""
    if model.training:
        raise ValueError("export_onnx_network: the model must be in eval mode (model.eval())")
    _register_deform_conv_symbolic(opset_version)
    network = HeadOutputs(model).eval()
    num_levels = len(model.head_in_features)
    names = onnx_output_names(num_levels)
    # The TorchScript-based exporter, on purpose: it has the DeformConv symbolic registered
    # above, and the torch.export-based one needs the onnxscript package, which HARNet does
    # not install. torch marks the former deprecated; that notice is not the user's to act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX",
                                category=DeprecationWarning)
        torch.onnx.export(
            network,
            (image,),
            path,
            input_names=["image"],
            output_names=names,
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                **{n: {2: f"{n}_h", 3: f"{n}_w"} for n in names},
            },
            opset_version=opset_version,
            dynamo=False,
        )


def _register_deform_conv_symbolic(opset_version: int) -> None:
    """Maps ``torchvision::deform_conv2d`` (aligned attention) to ONNX ``DeformConv``
    (opset 19: same offset layout, (y, x) pairs per kernel tap; optional mask)."""
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    if opset_version < 19:
        raise ValueError(
            f"HARNet's deformable convolution needs ONNX opset >= 19, got {opset_version}"
        )

    @parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
    def deform_conv2d(g, x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                      dil_h, dil_w, groups, offset_groups, use_mask):  # fmt: skip
        kernel = weight.type().sizes()[-2:]
        inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
        return g.op(
            "DeformConv",
            *inputs,
            dilations_i=[dil_h, dil_w],
            group_i=groups,
            offset_group_i=offset_groups,
            kernel_shape_i=kernel,
            pads_i=[pad_h, pad_w, pad_h, pad_w],
            strides_i=[stride_h, stride_w],
        )

    register_custom_op_symbolic("torchvision::deform_conv2d", deform_conv2d, opset_version)


def detections_from_head_outputs(
    model: nn.Module,
    outputs: Sequence[Tensor],
    image_size: Tuple[int, int],
    output_size: Optional[Tuple[int, int]] = None,
) -> Instances:
    """The post-processing step after the ONNX network: ``model``'s detections of one image
    from :class:`HeadOutputs`' outputs (e.g. onnxruntime's, as tensors).

    Args:
        model: the exported model (its anchor generator, box coding, thresholds and
            ``postprocess_params``).
        outputs: the network's outputs: per-level logits, then per-level deltas.
        image_size: (height, width) of the input image.
        output_size: (height, width) to rescale the detections to, as the "height" /
            "width" of Detectron2's inputs (default: ``image_size``).

    Returns:
        Instances: pred_boxes, scores, pred_classes, as ``model([{"image": image,
        "height": ..., "width": ...}])`` gives them (boxes clipped, empty ones dropped).
    """
    num_levels = len(outputs) // 2
    logits, deltas = list(outputs[:num_levels]), list(outputs[num_levels:])
    anchors = model.anchor_generator(logits)  # only the maps' sizes matter
    pred_logits, pred_deltas = model._transpose_dense_predictions(
        [logits, deltas], [model.num_classes, 4]
    )
    with torch.no_grad():
        result = model.inference_single_image(
            anchors,
            [x[0].sigmoid() for x in pred_logits],
            [x[0] for x in pred_deltas],
            tuple(image_size),
        )
    height, width = output_size or image_size
    return detector_postprocess(result, height, width)
