#!/usr/bin/env python
"""Export a HARRetinaNet (in the spirit of Detectron2's tools/deploy/export_model.py).

    # the whole detector (preprocessing, network, decoding, soft-NMS / box voting):
    python tools/export_model.py --config-file CFG.yaml --format torchscript --output export/ \\
        MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file CFG.yaml --format scripting --output export/ \\
        MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file CFG.yaml --format export --output export/ \\
        MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file CFG.yaml --format onnx --output export/ \\
        MODEL.WEIGHTS model_final.pth
    # the network only (image -> head outputs); post-processing is a separate step:
    python tools/export_model.py --config-file CFG.yaml --format onnx-network --output export/ \\
        MODEL.WEIGHTS model_final.pth

Formats and files (see harnet/export.py for the contracts):
  torchscript  export/model.ts   traced (Detectron2's TracingAdapter); torch.jit.load
  scripting    export/model.ts   scripted (Detectron2's scripting_with_instances); torch.jit.load
  export       export/model.pt2  torch.export, dynamic height/width (sides >= 2 px, the longer
                                 >= the coarsest stride + 1, 129 px for P3-P7); `import harnet`,
                                 then
                                 torch.export.load(path).module()
  onnx         export/model.onnx torch.onnx (dynamo), dynamic height/width (sides as for
                                 export); onnxruntime, input "image", outputs boxes, classes,
                                 scores
  onnx-network export/network.onnx input "image" [3, H, W], outputs logits_i / deltas_i per
                                 level (harnet.export.detections_from_head_outputs decodes)
The whole-detector formats map an image Tensor[3, H, W] (the model's input format,
cfg.INPUT.FORMAT, 0-255, already resized) to (boxes, classes, scores) in its pixels.

The sample image (--sample-image, resized like the test loader; default: a random image of
--sample-size) records the trace / example: the exported detector runs on other sizes.
After exporting, the exported model is compared with the eager one on random images
(--check-size H W, repeatable; default: the sample's size and 3/4 x 5/4 of it; --no-check
to skip): the largest differences, and the exported model's time as a ratio of eager's
(median of --repeats runs each, in this process).
"""

import argparse
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import harnet
from harnet.export import (
    HeadOutputs,
    export_onnx,
    export_onnx_network,
    export_program,
    export_scripting,
    export_torchscript,
)

FILES = {"torchscript": "model.ts", "scripting": "model.ts", "export": "model.pt2",
         "onnx": "model.onnx", "onnx-network": "network.onnx"}  # fmt: skip


def setup_cfg(args):
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu" if args.device is None else args.device
    cfg.freeze()
    return cfg


def sample_image(cfg, args) -> torch.Tensor:
    if args.sample_image:
        img = detection_utils.read_image(args.sample_image, format=cfg.INPUT.FORMAT)
        aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        img = aug.get_transform(img).apply_image(img)
        return torch.as_tensor(img.astype("float32").transpose(2, 0, 1))
    h, w = args.sample_size
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255


def load(path, fmt, device):
    """The exported model as ``fn(image) -> list of tensors`` (and ``want(model, image)``,
    the eager tensors it must match)."""

    def eager(model, image):
        instances = model([{"image": image}])[0]["instances"]
        return [instances.pred_boxes.tensor, instances.pred_classes, instances.scores]

    if fmt.startswith("onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path)
        run = lambda image: [  # noqa: E731
            torch.from_numpy(o) for o in session.run(None, {"image": image.cpu().numpy()})
        ]
        if fmt == "onnx":
            return run, lambda model, image: [t.cpu() for t in eager(model, image)]
        return run, lambda model, image: [t.cpu() for t in HeadOutputs(model)(image)]
    exported = torch.export.load(path).module() if fmt == "export" else torch.jit.load(
        path, map_location=device
    )
    return lambda image: list(exported(image)), eager


def median_seconds(fn, image, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(model, exported_path, fmt, sizes, repeats=3):
    """Largest differences between the exported and the eager model on random images, and
    the exported model's time as a ratio of the eager one's."""
    device = next(model.parameters()).device
    run, want = load(exported_path, fmt, device)
    g = torch.Generator().manual_seed(1)
    for h, w in tqdm(sizes, desc="checking"):
        image = (torch.rand(3, h, w, generator=g) * 255).to(device)
        with torch.no_grad():
            got, expected = run(image), want(model, image)
            exported_s = median_seconds(run, image, repeats)
            eager_s = median_seconds(lambda im: want(model, im), image, repeats)
        same_count = all(a.shape == b.shape for a, b in zip(got, expected))
        diff = max(
            (float((a.float() - b.float()).abs().max()) for a, b in zip(got, expected)
             if a.numel() and a.shape == b.shape),
            default=0.0,
        )  # fmt: skip
        paired = ""
        if fmt != "onnx-network" and same_count and diff > 1e-3:
            paired = f" ({paired_difference(got, expected):.3g} pairing each detection with "
            paired += "its closest eager one: tied scores in another order)"
        print(
            f"{h}x{w}: {'same shapes' if same_count else 'DIFFERENT SHAPES'}, "
            f"max |difference| {diff:.3g}{paired}; time exported / eager "
            f"{exported_s / eager_s:.2f}x ({exported_s * 1e3:.1f} ms / {eager_s * 1e3:.1f} ms, "
            f"median of {repeats})"
        )


def paired_difference(got, expected) -> float:
    """The largest difference (box coordinates, score) between each detection and the
    closest eager detection of its class: 0 when only tied detections swapped places."""
    (boxes, classes, scores), (e_boxes, e_classes, e_scores) = got, expected
    if not len(boxes):
        return 0.0
    pair = torch.maximum(
        (boxes[:, None].float() - e_boxes[None].float()).abs().amax(dim=2),
        (scores[:, None].float() - e_scores[None].float()).abs(),
    )
    pair = torch.where(classes[:, None] == e_classes[None], pair, float("inf"))
    return float(pair.min(dim=1)[0].max())


def export(model, image, fmt, path):
    if fmt == "torchscript":
        export_torchscript(model, image, path)
    elif fmt == "scripting":
        export_scripting(model, path)
    elif fmt == "export":
        export_program(model, image, path)
    elif fmt == "onnx":
        export_onnx(model, image, path)
    else:
        export_onnx_network(model, image, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=list(FILES), default="torchscript")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--sample-image", default=None, help="image to trace with")
    parser.add_argument("--sample-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--device", default=None, help="default: cpu")
    parser.add_argument("--check-size", type=int, nargs=2, action="append", metavar=("H", "W"),
                        help="compare with the eager model on an image of this size")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and size")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logger = setup_logger(name="harnet.export")
    cfg = setup_cfg(args)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = sample_image(cfg, args).to(cfg.MODEL.DEVICE)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FILES[args.format])
    try:
        export(model, image, args.format, path)
    except ValueError as e:  # a format / option that cannot export: say which, no traceback
        print(f"export_model.py: --format {args.format}: {e}", file=sys.stderr)
        return 2
    logger.info(f"Exported {args.format} to {path} (example image {tuple(image.shape[1:])})")
    h, w = image.shape[1:]
    sizes = args.check_size or [(h, w), (h * 3 // 4, w * 5 // 4)]
    if not args.no_check:
        check(model, path, args.format, sizes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
