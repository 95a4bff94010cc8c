#!/usr/bin/env python
"""Generate the built-in shapes dataset and print its generation speed and statistics.

    python tools/shapes_dataset.py                      # default train split (1000 images)
    python tools/shapes_dataset.py --split val --preview /tmp/shapes_val.png
    python tools/shapes_dataset.py --num-images 500 --image-size 256 256 --object-size 8 200

By default it generates into a fresh temporary folder (so the timing is a real
generation); ``--root`` uses/keeps a cache root instead (an existing valid cache is then
only validated). Statistics are read back from the COCO JSON with pycocotools.
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections import Counter

import cv2
import numpy as np
from pycocotools.coco import COCO

from harnet.data import SHAPES_CLASSES, ShapesSpec, ensure_shapes
from harnet.data.shapes import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--split",
        choices=["train", "val"],
        default="train",
        help="built-in split defaults: train = seed S, %d images; val = seed S+1, %d images"
        % (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL),
    )
    p.add_argument("--seed", type=int, default=ShapesSpec.seed, help="S (train seed)")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--image-format", choices=["jpg", "png"], default=None)
    p.add_argument(
        "--root", default=None, help="cache root to use and keep (default: a temporary folder)"
    )
    p.add_argument(
        "--preview", default=None, help="write a PNG mosaic of the first 12 images with boxes"
    )
    return p.parse_args(argv)


def _hist(values, edges, fmt="{:g}"):
    counts, _ = np.histogram(values, bins=edges)
    total = max(len(values), 1)
    lines = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        label = f"[{fmt.format(lo)}, {fmt.format(hi)})"
        lines.append(
            f"  {label:>14} {c:6d} {100.0 * c / total:5.1f}% " + "#" * int(round(60 * c / total))
        )
    return "\n".join(lines)


def print_statistics(json_file):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
    anns = coco.dataset["annotations"]
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
    area = np.array([a["area"] for a in anns], dtype=np.float64)
    longer = boxes[:, 2:].max(1)
    aspect = boxes[:, 2] / boxes[:, 3]
    n_img = len(coco.imgs)
    print(f"images {n_img}, objects {len(anns)} ({len(anns) / n_img:.2f} per image)")

    counts = Counter(coco.cats[a["category_id"]]["name"] for a in anns)
    print("class counts:")
    for name in SHAPES_CLASSES:
        print(f"  {name:>9} {counts[name]:6d} {100.0 * counts[name] / len(anns):5.1f}%")
    print(f"  head/tail ratio {max(counts.values()) / max(min(counts.values()), 1):.1f}")

    print(
        f"longer box side (px): min {longer.min():.0f}, median {np.median(longer):.0f}, "
        f"max {longer.max():.0f}"
    )
    print(_hist(longer, [1, 8, 16, 32, 64, 128, 256, 512], "{:.0f}"))
    small, large = (area < 32**2).mean(), (area >= 96**2).mean()
    print(
        f"COCO area buckets (area = visible pixels): small {100 * small:.1f}%, "
        f"medium {100 * (1 - small - large):.1f}%, large {100 * large:.1f}%"
    )
    print("box aspect ratio w/h:")
    print(_hist(aspect, [0, 0.25, 0.5, 0.8, 1.25, 2, 4, 100], "{:g}"))

    vis = np.array([a.get("visible_fraction", 1.0) for a in anns])
    overlap_imgs, overlap_pairs = 0, 0
    for img_id in coco.imgs:
        b = np.array([a["bbox"] for a in coco.imgToAnns[img_id]], dtype=np.float64)
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
        iw = np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None])
        ih = np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None])
        pairs = int(np.triu((iw > 0) & (ih > 0), 1).sum())
        overlap_pairs += pairs
        overlap_imgs += pairs > 0
    print(
        f"occlusion: {100 * (vis < 1).mean():.1f}% of objects partly hidden (occluded or cut by "
        f"the border), {100 * (vis < 0.75).mean():.1f}% more than 25% hidden; min visible "
        f"{vis.min():.2f}; images with overlapping boxes {100 * overlap_imgs / n_img:.1f}%, "
        f"{overlap_pairs / n_img:.2f} overlapping box pairs per image"
    )


def write_preview(json_file, image_root, path, n=12, cols=4):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
    tiles = []
    for img_id in sorted(coco.imgs)[:n]:
        img = cv2.imread(os.path.join(image_root, coco.imgs[img_id]["file_name"]))
        for a in coco.imgToAnns[img_id]:
            x, y, w, h = (int(v) for v in a["bbox"])
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), (0, 255, 0), 1)
            cv2.putText(
                img,
                coco.cats[a["category_id"]]["name"],
                (x, max(y - 2, 8)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.35,
                (255, 255, 255),
                1,
                cv2.LINE_AA,
            )
        tiles.append(img)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    tiles = [
        cv2.copyMakeBorder(t, 0, h - t.shape[0], 0, w - t.shape[1], cv2.BORDER_CONSTANT)
        for t in tiles
    ]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    rows = [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]
    cv2.imwrite(path, np.vstack(rows))
    print(f"preview written to {path}")


def main(argv=None):
    args = parse_args(argv)
    kwargs = {
        "seed": args.seed + (args.split == "val"),
        "num_images": args.num_images
        or (DEFAULT_NUM_TRAIN if args.split == "train" else DEFAULT_NUM_VAL),
    }
    for key in ("image_size", "object_size", "image_format"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    spec = ShapesSpec(**kwargs)
    print(f"spec: {spec}")
    with contextlib.ExitStack() as stack:
        root = args.root or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="harnet_shapes_")
        )
        wall, cpu = time.perf_counter(), time.process_time()
        json_file, image_root = ensure_shapes(spec, root)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = spec.num_images
        print(
            f"ensure_shapes: {wall:.2f} s wall, {cpu:.2f} s CPU for {n} images "
            f"({n / wall:.0f} img/s wall, {1000 * cpu / n:.1f} ms CPU per image); "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        size = sum(os.path.getsize(os.path.join(image_root, f)) for f in os.listdir(image_root))
        print(f"on disk: {size / 2 ** 20:.1f} MiB of images in {os.path.dirname(json_file)}")
        print_statistics(json_file)
        if args.preview:
            write_preview(json_file, image_root, args.preview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
