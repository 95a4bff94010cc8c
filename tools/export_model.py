#!/usr/bin/env python
"""Export a HARRetinaNet (in the spirit of Detectron2's tools/deploy/export_model.py).

    # the whole detector, post-processing included (soft-NMS, box voting), TorchScript:
    python tools/export_model.py --config-file configs/HARNet/har_R_50_FPN_1x.yaml \\
        --format torchscript --output export/ MODEL.WEIGHTS model_final.pth
    # the network (image -> head outputs) as ONNX; post-processing is a separate step:
    python tools/export_model.py --config-file CFG.yaml --format onnx --output export/ \\
        --sample-image img.jpg MODEL.WEIGHTS model_final.pth

Writes export/model.ts (``torch.jit.load``: ``forward(image[3, H, W]) -> (boxes, classes,
scores)``) or export/model.onnx (input "image" [3, H, W], outputs logits_i / deltas_i per
level); see harnet/export.py for the contract. The image is in the model's input format
(cfg.INPUT.FORMAT, 0-255), already resized: export/model.ts does not resize.

The sample image (--sample-image, resized like the test loader; default: a random image of
--sample-size) is only used to record the trace: the exported detector runs on any size.
After exporting, the exported model is compared with the eager one on random images
(--check-size H W, repeatable; default: the sample's size and twice it; --no-check to skip)
and the largest differences are printed.
"""

import argparse
import os
import sys

import torch
from tqdm import tqdm

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import harnet
from harnet.export import HeadOutputs, export_onnx, export_torchscript


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


def check(model, exported_path, fmt, sizes):
    """Largest differences between the exported and the eager model on random images."""
    device = next(model.parameters()).device
    if fmt == "torchscript":
        exported = torch.jit.load(exported_path, map_location=device)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(exported_path)
    g = torch.Generator().manual_seed(1)
    for h, w in tqdm(sizes, desc="checking"):
        image = (torch.rand(3, h, w, generator=g) * 255).to(device)
        with torch.no_grad():
            if fmt == "torchscript":
                eager = model([{"image": image}])[0]["instances"]
                boxes, classes, scores = exported(image)
                got = [boxes, scores, classes]
                want = [eager.pred_boxes.tensor, eager.scores, eager.pred_classes]
            else:
                got = [
                    torch.from_numpy(o) for o in session.run(None, {"image": image.cpu().numpy()})
                ]
                want = [t.cpu() for t in HeadOutputs(model)(image)]
        same_count = all(a.shape == b.shape for a, b in zip(got, want))
        diff = max(
            (float((a.float() - b.float()).abs().max()) for a, b in zip(got, want) if a.numel()),
            default=0.0,
        )
        print(
            f"{h}x{w}: {'same shapes' if same_count else 'DIFFERENT SHAPES'}, "
            f"max |difference| {diff:.3g}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--sample-image", default=None, help="image to trace with")
    parser.add_argument("--sample-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--device", default=None, help="default: cpu")
    parser.add_argument("--check-size", type=int, nargs=2, action="append", metavar=("H", "W"),
                        help="compare with the eager model on an image of this size")  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the comparison")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logger = setup_logger(name="harnet.export")
    cfg = setup_cfg(args)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = sample_image(cfg, args).to(cfg.MODEL.DEVICE)
    os.makedirs(args.output, exist_ok=True)
    if args.format == "torchscript":
        path = os.path.join(args.output, "model.ts")
        export_torchscript(model, image, path)
    else:
        path = os.path.join(args.output, "model.onnx")
        export_onnx(model, image, path)
    logger.info(f"Exported {args.format} to {path} (traced on a {tuple(image.shape[1:])} image)")
    h, w = image.shape[1:]
    sizes = args.check_size or [(h, w), (2 * h, 2 * w)]
    if not args.no_check:
        check(model, path, args.format, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
