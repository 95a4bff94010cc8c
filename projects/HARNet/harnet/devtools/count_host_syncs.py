#!/usr/bin/env python
"""Count the host-device synchronisations of a training step and of inference, on any
device (the CPU included): every op that would make the host wait for a CUDA stream.

Counted, with the file and line that called them (HARNet's, Detectron2's, torchvision's):
``_local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``), ``nonzero``,
``masked_select``, ``unique*``, ``repeat_interleave`` without an output size,
boolean-mask ``index`` / ``index_put``, and ``Tensor.tolist()`` / ``.cpu()`` / ``.numpy()``.
On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports the same points; this tool
shows them where no GPU is at hand (docs/cuda_audit.md).

    python dev/count_host_syncs.py                      # the CPU demo config, 2 images
    python dev/count_host_syncs.py --config-file configs/HARNet/har_R_50_FPN_1x.yaml \\
        --size 256 320 MODEL.DEVICE cpu
"""

import argparse
import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import harnet

SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique_consecutive",
    "_unique2",
    "unique_dim",
    "repeat_interleave",
}
DEMO_CONFIG = "configs/HARNet/demo/har_R18_shapes_demo.yaml"
AUTHORS_POSTPROCESS = [
    "MODEL.HARNET.POSTPROCESS.NMS_TYPE", "gaussian",
    "MODEL.HARNET.POSTPROCESS.VOTING.ENABLED", True,
    "MODEL.HARNET.POSTPROCESS.VOTING.SCORING", "caffe",
]  # fmt: skip
ALL_OFF = [f"MODEL.HARNET.{m}.ENABLED" for m in ("ALIGN", "CLGN", "SPATIAL", "CHANNEL")]


def _caller(skip: int = 3) -> str:
    """The innermost frame of HARNet, Detectron2 or torchvision that led to the op
    (``skip``: this function's and the counting machinery's frames)."""
    for frame in reversed(traceback.extract_stack()[:-skip]):
        name = frame.filename
        if "site-packages/" in name:  # an installed package: its path from there
            short = name.split("site-packages/")[-1]
        elif "projects/HARNet/harnet/" in name:  # this repository's package
            short = name.split("projects/HARNet/")[-1]
        else:
            continue
        if short.startswith(("harnet/", "detectron2/", "torchvision/")):
            return f"{short}:{frame.lineno} {frame.name}"
    return "(torch internals, e.g. autograd)"


def _is_bool_index(name, args) -> bool:
    if name not in ("index", "index_put", "index_put_") or len(args) < 2:
        return False
    indices = args[1] if isinstance(args[1], (list, tuple)) else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class HostSyncCounter(TorchDispatchMode):
    """Within ``with HostSyncCounter() as c:``, ``c.counts`` counts each syncing op by
    ``"op @ file:line function"``."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self._patched = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            pass  # the output size is given: no sync
        elif name in SYNCING_OPS:
            self.counts[f"{name} @ {_caller()}"] += 1
        elif _is_bool_index(name, args):
            self.counts[f"{name}[bool] @ {_caller()}"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, method)
            self._patched[method] = vars(torch.Tensor).get(method)  # None: inherited

            def counted(t, *a, _m=method, _orig=original, **k):
                self.counts[f"{_m}() @ {_caller(skip=2)}"] += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            if original is None:
                delattr(torch.Tensor, method)
            else:
                setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


def _batch(size, device, with_instances):
    g = torch.Generator().manual_seed(1)
    h, w = size
    out = []
    for _ in range(2):
        d = {"image": (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)}
        d.update(height=h, width=w)
        if with_instances:
            boxes = torch.tensor([[0.06, 0.05, 0.4, 0.3], [0.3, 0.15, 0.7, 0.5]]) * torch.tensor(
                [w, h, w, h]
            )
            d["instances"] = Instances(
                (h, w), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 1])
            )
        out.append(d)
    return out


def count(cfg, size, train: bool, tta: bool = False) -> collections.Counter:
    """Syncing ops of one training step (forward + backward) or one inference, 2 images,
    after a warm-up call."""
    torch.manual_seed(0)
    model = build_model(cfg).train(train)
    if tta:
        model = harnet.HARRetinaNetWithTTA(cfg, model)
    with EventStorage(0), torch.set_grad_enabled(train):
        model(_batch(size, cfg.MODEL.DEVICE, train))  # warm-up (lazy inits, caches)
        with HostSyncCounter() as counter:
            out = model(_batch(size, cfg.MODEL.DEVICE, train))
            if train:
                sum(out.values()).backward()
    return counter.counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    parser.add_argument("--top", type=int, default=8, help="call sites listed per case")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = get_cfg()
    harnet.add_harnet_config(base)
    base.merge_from_file(args.config_file)
    base.merge_from_list(args.opts)
    if base.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        base.MODEL.DEVICE = "cpu"  # the syncs are counted on any device
    base.TEST.AUG.MIN_SIZES, base.TEST.AUG.MAX_SIZE = (min(args.size), max(args.size)), 1000
    # An untrained model scores below Detectron2's 0.05: no candidates would reach the
    # post-processing. Threshold 0 gives every level its top-k candidates, as a trained
    # model's crowded image would.
    base.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0

    def variant(*opts):
        cfg = base.clone()
        cfg.merge_from_list(list(opts))
        return cfg

    off = [v for key in ALL_OFF for v in (key, False)]
    per_level = ["MODEL.HARNET.LOSS.NORMALIZER", "per_level"]
    cases = [
        ("RetinaNet (all off), training step", variant(*off), True, False),
        ("HAR-Net, training step", variant(), True, False),
        ("HAR-Net, training step, per-level normaliser", variant(*per_level), True, False),
        ("RetinaNet (all off), inference", variant(*off), False, False),
        ("HAR-Net, inference (config's post-processing)", variant(), False, False),
        ("HAR-Net, inference, soft-NMS + caffe voting", variant(*AUTHORS_POSTPROCESS), False, False),
        ("HAR-Net, TTA 2 scales x flip, soft-NMS + voting", variant(*AUTHORS_POSTPROCESS), False, True),
    ]  # fmt: skip
    print(f"| case (2 images of {args.size[0]}x{args.size[1]}) | syncing ops | HARNet's own |")
    print("|---|---|---|")
    details = []
    for label, cfg, train, tta in cases:
        counts = count(cfg, args.size, train, tta)
        own = sum(v for k, v in counts.items() if "harnet/" in k)
        print(f"| {label} | {sum(counts.values())} | {own} |", flush=True)
        details.append((label, counts))
    for label, counts in details:
        print(f"\n{label}:")
        for site, n in counts.most_common(args.top):
            print(f"  {n:4d}  {site}")


if __name__ == "__main__":
    main()
