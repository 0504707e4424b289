#!/usr/bin/env python
"""Writes a tiny COCO-format instance segmentation dataset of simple shapes.

Layout (the real COCO one):
    OUT/annotations/instances_train.json, OUT/annotations/instances_val.json
    OUT/train/*.png, OUT/val/*.png

Three categories with COCO-style non-contiguous ids (square=1, circle=3, triangle=5),
each drawn in its own hue (jittered) on a noisy background, 1-3 objects per image, masks
as polygons. Optionally every k-th object is stored as a compressed RLE instead of a
polygon, and every k-th image gets an extra `iscrowd=1` region (uncompressed RLE, as
COCO stores crowds), so loaders are exercised on all three encodings.

    python tools/make_tiny_coco.py OUT [--num-train 160 --num-val 40 --size 128]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from typing import Any, Dict, List, Tuple

import numpy as np

CATEGORIES = [dict(id=1, name="square", supercategory="shape"),
              dict(id=3, name="circle", supercategory="shape"),
              dict(id=5, name="triangle", supercategory="shape")]
_HUES = {1: (220, 60, 60), 3: (60, 200, 60), 5: (70, 90, 230)}


def _polygon(cat_id: int, cx: float, cy: float, r: float, angle: float) -> List[float]:
    if cat_id == 1:
        n, phase = 4, angle + math.pi / 4
    elif cat_id == 5:
        n, phase = 3, angle - math.pi / 2
    else:
        n, phase = 24, 0.0
    pts = []
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        pts += [round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)]
    return pts


def _uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = np.asfortranarray(mask).flatten(order="F").astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return dict(size=[int(mask.shape[0]), int(mask.shape[1])], counts=[int(c) for c in counts])


def _draw_image(rng: random.Random, size: int, max_objects: int) -> Tuple[Any, List[Tuple[int, List[float]]]]:
    from PIL import Image, ImageDraw

    base = np.array([rng.randint(90, 160)] * 3, dtype=np.float32)
    noise = np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, 8, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects: List[Tuple[int, List[float]]] = []
    placed: List[Tuple[float, float, float]] = []
    for _ in range(rng.randint(1, max_objects)):
        for _attempt in range(20):
            r = rng.uniform(size * 0.1, size * 0.22)
            cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            if all(math.hypot(cx - x, cy - y) > r + rr + 2 for x, y, rr in placed):
                break
        else:
            continue
        cat_id = rng.choice([c["id"] for c in CATEGORIES])
        poly = _polygon(cat_id, cx, cy, r, rng.uniform(0, math.pi / 2))
        color = tuple(int(np.clip(c + rng.randint(-25, 25), 0, 255)) for c in _HUES[cat_id])
        draw.polygon(poly, fill=color)
        placed.append((cx, cy, r))
        objects.append((cat_id, poly))
    return img, objects


def make_split(out_dir: str, split: str, num_images: int, size: int, seed: int, max_objects: int = 3,
               rle_every: int = 0, crowd_every: int = 0) -> str:
    """Writes one split; returns the annotation file path."""
    from pycocotools import mask as mask_utils

    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        img, objects = _draw_image(rng, size, max_objects)
        image_id = 1000 + i  # ids that are not list positions, as in COCO
        file_name = f"{split}_{i:05d}.png"
        img.save(os.path.join(img_dir, file_name))
        images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
        for cat_id, poly in objects:
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], size, size))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            if rle_every and ann_id % rle_every == 0:
                segm: Any = dict(size=[size, size], counts=rle["counts"].decode("ascii"))
            else:
                segm = [poly]
            annotations.append(dict(id=ann_id, image_id=image_id, category_id=cat_id, segmentation=segm,
                                    area=float(mask_utils.area(rle)), bbox=[x, y, w, h], iscrowd=0))
            ann_id += 1
        if crowd_every and i % crowd_every == 0:
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[: size // 8, : size // 8] = 1  # a corner region, marked as a crowd
            annotations.append(dict(id=ann_id, image_id=image_id, category_id=CATEGORIES[0]["id"],
                                    segmentation=_uncompressed_rle(mask), area=float(mask.sum()),
                                    bbox=[0.0, 0.0, float(size // 8), float(size // 8)], iscrowd=1))
            ann_id += 1
    ann_file = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    data = dict(info=dict(description="convnext-backbone tiny shapes"), licenses=[], images=images,
                annotations=annotations, categories=CATEGORIES)
    tmp = ann_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, ann_file)
    return ann_file


def make_tiny_coco(out_dir: str, num_train: int = 160, num_val: int = 40, size: int = 128,
                   seed: int = 0, max_objects: int = 3, rle_every: int = 0,
                   crowd_every: int = 0) -> Dict[str, str]:
    """Writes train and val splits.

    Args:
        out_dir: dataset root.
        num_train / num_val: images per split.
        size: square image side in pixels.
        seed: RNG seed (val uses seed + 1).
        max_objects: at most this many shapes per image.
        rle_every: store every k-th object's mask as compressed RLE (0: all polygons).
        crowd_every: add an `iscrowd=1` region to every k-th image (0: none).

    Returns:
        dict with `root`, `train_ann`, `val_ann`, `train_img_dir`, `val_img_dir`.
    """
    train_ann = make_split(out_dir, "train", num_train, size, seed, max_objects, rle_every, crowd_every)
    val_ann = make_split(out_dir, "val", num_val, size, seed + 1, max_objects, rle_every, crowd_every)
    return dict(root=out_dir, train_ann=train_ann, val_ann=val_ann,
                train_img_dir=os.path.join(out_dir, "train"), val_img_dir=os.path.join(out_dir, "val"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--num-train", type=int, default=160)
    p.add_argument("--num-val", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--rle-every", type=int, default=0)
    p.add_argument("--crowd-every", type=int, default=0)
    args = p.parse_args(argv)
    paths = make_tiny_coco(args.out_dir, args.num_train, args.num_val, args.size, args.seed,
                           args.max_objects, args.rle_every, args.crowd_every)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
