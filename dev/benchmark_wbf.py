#!/usr/bin/env python
"""Speed of ``harnet.layers.weighted_boxes_fusion`` on a COCO-like test-time-augmentation
merge, against the ``ensemble-boxes`` package (numpy; the usual offline tool) and
torchvision's ``batched_nms`` (the cost of a plain suppression of the same boxes), all
measured in the same run on the same input.

Input: ``--views`` views of one 800 x 1200 image, each the detections of a RetinaNet-like
model after its own NMS (at most ``--per-view`` of them, 80 categories): jittered boxes
around ``--objects`` shared objects (views see them slightly differently), weaker copies in
confusable categories, and low-scoring false positives (also shared, jittered per view).
``one class`` puts every detection in one category: the longest sequential chain, the
worst case of the greedy loop (one step per box).

  python dev/benchmark_wbf.py                       # 3 views x 100 detections, CPU (+ GPU)
  python dev/benchmark_wbf.py --repeats 50 --views 6

Prints a markdown table: the fastest and the median of the repeats in milliseconds per
merge (on a machine shared with other jobs the minimum is the steadier figure), and each
method's minimum as a ratio of ensemble-boxes's.
"""

import argparse
import os
import statistics
import time
import warnings
from unittest import mock

import numpy as np
import torch
from torchvision.ops import batched_nms
from tqdm import tqdm

from harnet.devtools import device_name
from harnet.layers import weighted_boxes_fusion

H, W = 800, 1200


def synthetic_views(num_views=3, per_view=100, num_classes=80, num_objects=15, seed=0):
    """Per view: (boxes Tensor[n, 4], scores Tensor[n], classes Tensor[n]) after NMS."""
    g = torch.Generator().manual_seed(seed)
    n_bg = 3 * per_view  # false positives: objects of low confidence, anywhere
    num_all = num_objects + n_bg
    size = torch.exp(torch.rand(num_all, 2, generator=g) * 4.0) * 8  # 8 to 440 px
    centre = torch.rand(num_all, 2, generator=g) * torch.tensor([W, H])
    cls = torch.randint(0, num_classes, (num_all,), generator=g)
    conf = torch.cat(
        [
            torch.rand(num_objects, generator=g) * 0.6 + 0.3,
            torch.rand(n_bg, generator=g) * 0.25 + 0.05,
        ]
    )
    views = []
    for _ in range(num_views):
        reps = 6
        jitter = torch.randn(num_all, reps, 4, generator=g) * 0.08
        c = centre[:, None] + jitter[..., :2] * size[:, None]
        wh = size[:, None] * torch.exp(jitter[..., 2:])
        boxes = torch.cat([c - wh / 2, c + wh / 2], -1).reshape(-1, 4)
        scores = (conf[:, None] * torch.exp(-jitter.abs().sum(-1) * 3)).reshape(-1)
        scores = scores * torch.exp(torch.randn(len(scores), generator=g) * 0.1)  # per view
        classes = cls[:, None].expand(-1, reps).reshape(-1)
        confused = torch.randint(0, num_classes, (num_all * reps,), generator=g)
        boxes = torch.cat([boxes, boxes])
        scores = torch.cat([scores, scores * 0.3])
        classes = torch.cat([classes, confused])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, classes = boxes[ok], scores[ok], classes[ok]
        keep = batched_nms(boxes, scores, classes, 0.5)[:per_view]
        views.append((boxes[keep], scores[keep], classes[keep]))
    return views


def _time_ms(fn, repeats, sync=None):
    """(fastest, median) milliseconds of ``repeats`` calls."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times), statistics.median(times)


def run_case(views, repeats, devices):
    scale = np.array([W, H, W, H], dtype=np.float64)
    np_views = [(b.double().numpy() / scale, s.double().numpy(), c.numpy()) for b, s, c in views]
    flat = [torch.cat(t) for t in zip(*views)]
    ids = torch.cat([torch.full((len(v[1]),), i, dtype=torch.long) for i, v in enumerate(views)])

    import ensemble_boxes

    def reference():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ensemble_boxes.weighted_boxes_fusion(*map(list, zip(*np_views)), iou_thr=0.55)

    results = {"ensemble-boxes (numpy, CPU)": (_time_ms(reference, repeats), len(reference()[0]))}
    for device in devices:
        b, s, c, v = (t.to(device) for t in (*flat, ids))
        sync = torch.cuda.synchronize if device == "cuda" else None

        def ours():
            return weighted_boxes_fusion(b, s, c, v, len(views), iou_threshold=0.55)

        def nms():
            return batched_nms(b, s, c, 0.55)

        results[f"harnet weighted_boxes_fusion ({device})"] = (
            _time_ms(ours, repeats, sync),
            len(ours()[0]),
        )
        if device == "cpu":  # the tensor loop that a GPU runs (numba off), for comparison
            with mock.patch.dict(os.environ, {"HARNET_WBF_NUMBA": "0"}):
                results["harnet weighted_boxes_fusion (cpu, tensor loop: HARNET_WBF_NUMBA=0)"] = (
                    _time_ms(ours, repeats, sync),
                    len(ours()[0]),
                )
        results[f"torchvision batched_nms ({device}, baseline of a plain suppression)"] = (
            _time_ms(nms, repeats, sync),
            len(nms()),
        )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--per-view", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = {
        "COCO-like (80 classes)": synthetic_views(args.views, args.per_view),
        "one class": synthetic_views(args.views, args.per_view, num_classes=1),
    }
    rows = []
    for name, views in tqdm(cases.items(), desc="cases"):
        n_in = sum(len(v[1]) for v in views)
        n_cls = len(torch.unique(torch.cat([v[2] for v in views])))
        results = run_case(views, args.repeats, devices)
        base = results["ensemble-boxes (numpy, CPU)"][0][0]
        for method, ((fastest, median), n_out) in results.items():
            rows.append(
                f"| {name}: {n_in} boxes, {n_cls} classes | {method} | {fastest:.2f} | "
                f"{median:.2f} | {fastest / base:.3f} | {n_out} |"
            )
    print(f"\n{args.views} views, <= {args.per_view} detections each, {args.repeats} repeats; "
          f"{device_name('cpu')}\n")
    print("| input | method | ms (min) | ms (median) | x ensemble-boxes (min) | boxes out |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
