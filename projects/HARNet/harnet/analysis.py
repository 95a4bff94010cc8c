"""Cost analysis of RetinaNet-style models (library code of ``tools/analyze_model.py`` and
``dev/benchmark.py``): the dense forward that FLOPs are counted on, and the count.

FLOPs follow fvcore / Detectron2: one multiply-add = one flop, element-wise ops ignored.
The deformable convs of the aligned attention are counted like regular convs of the same
shape (torchvision::deform_conv2d has no fvcore handle; :func:`deform_conv2d_flop_jit` adds
one); the bilinear sampling they add (4 multiply-adds per sampled value) is not.
"""

from collections import OrderedDict

from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import conv_flop_count, get_shape
from torch import nn

__all__ = ["DenseForward", "deform_conv2d_flop_jit", "flop_count"]


def deform_conv2d_flop_jit(inputs, outputs):
    """fvcore handle for torchvision::deform_conv2d(input, weight, offset, mask, bias, ...):
    the multiply-adds of a conv with the same input, weight and output shapes."""
    x_shape, w_shape, out_shape = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    return conv_flop_count(x_shape, w_shape, out_shape)


class DenseForward(nn.Module):
    """The traceable part of a RetinaNet-style model: normalise and pad the image, backbone,
    head. Candidate decoding and NMS (no multiply-adds worth counting) are left out.
    (Detectron2's own FlopCountAnalysis wrapper needs detectron2.export, which imports
    caffe2 in Detectron2 0.6.)"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        images = self.model.preprocess_image([{"image": image}])
        features = self.model.backbone(images.tensor)
        logits, deltas = self.model.head([features[f] for f in self.model.head_in_features])
        return tuple(logits) + tuple(deltas)


def flop_count(model, inputs):
    """FLOPs of ``DenseForward(model)`` on ``inputs[0]["image"]``.

    Returns:
        total (int), own (OrderedDict ``"<module name>." -> its own flops``, a partition of
        the total by module name), unsupported (dict op -> count).
    """
    flops = FlopCountAnalysis(DenseForward(model), (inputs[0]["image"],))
    flops.set_op_handle("torchvision::deform_conv2d", deform_conv2d_flop_jit)
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = flops.total()
    by_module = flops.by_module()
    # TracingAdapter wraps the model as ".model"; strip that prefix.
    by_module = {
        (k[len("model.") :] if k.startswith("model.") else ("" if k == "model" else k)): v
        for k, v in by_module.items()
    }
    # Each module's own flops (its total minus its children's): a partition of the total
    # by module name, so parts can be summed by name prefix.
    own = OrderedDict()
    for name, module in model.named_modules():
        children = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
        own[name + "."] = by_module.get(name, 0) - sum(by_module.get(c, 0) for c in children)
    return total, own, dict(flops.unsupported_ops())
