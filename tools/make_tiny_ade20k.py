#!/usr/bin/env python
"""Writes a small dataset in ADE20K's on-disk format, with content a model can learn.

Layout (what mmseg's `ADE20KDataset` reads):
    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_%08d.png

Labels follow ADE20K's 150-class convention: 0 is "other" (ignored with
`reduce_zero_label=True`), 1..150 are the classes. Each image is a textured background
("wall") with a few shapes whose class decides both colour family and texture:
disks are "tree", squares are "building", triangles are "sky", horizontal bars are
"floor" (ADE20K's first five classes, so a small head predicts only those); a few small blobs of random noise are labelled 0 (ignored). Colours are jittered
per shape so that a model has to use texture and colour together, and shapes vary in size
and position. Deterministic for a given seed.

Usage:
    python tools/make_tiny_ade20k.py data/tiny_ade20k --train 48 --val 12 --size 128
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Tuple

import numpy as np

# ADE20K label ids (1-based, before reduce_zero_label) -> (name, base RGB colour, texture)
CLASSES: Dict[int, Tuple[str, Tuple[int, int, int], str]] = {
    1: ("wall", (150, 140, 130), "stripes"),
    2: ("building", (60, 60, 170), "checker"),
    3: ("sky", (200, 60, 60), "flat"),
    4: ("floor", (110, 110, 110), "diagonal"),
    5: ("tree", (40, 150, 50), "dots"),
}
# The first five ADE20K classes, so a model's head can predict just those (NUM_CLASSES).
NUM_CLASSES = 5
SHAPES = {"disk": 5, "square": 2, "triangle": 3, "bar": 4}

__all__ = ["make_dataset", "make_sample", "CLASSES", "NUM_CLASSES"]


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.integers(0, 8)
    if kind == "stripes":
        t = ((yy + phase) // 4) % 2
    elif kind == "checker":
        t = (((yy + phase) // 6) + ((xx + phase) // 6)) % 2
    elif kind == "dots":
        t = (((yy + phase) % 5) < 2) & (((xx + phase) % 5) < 2)
    elif kind == "diagonal":
        t = ((xx + yy + phase) // 4) % 2
    else:
        t = np.zeros((h, w))
    return t.astype(np.float32) * 2.0 - 1.0


def _paint(img: np.ndarray, mask: np.ndarray, label_id: int, rng: np.random.Generator) -> None:
    _, colour, texture = CLASSES[label_id]
    h, w = mask.shape
    base = np.array(colour, np.float32) + rng.normal(0, 12, 3)
    tex = _texture(texture, h, w, rng)[..., None] * 25.0
    noise = rng.normal(0, 6, (h, w, 3))
    img[mask] = np.clip(base + tex + noise, 0, 255)[mask]


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    r = rng.integers(size // 10, size // 4)
    cy, cx = rng.integers(r, size - r), rng.integers(r, size - r)
    if kind == "disk":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    if kind == "triangle":
        # apex up: rows below the apex widen linearly
        return (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    # bar: a horizontal band across the image
    return (yy >= cy - r // 2) & (yy <= cy + r // 2)


def make_sample(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 label map with ADE ids) pair."""
    img = np.zeros((size, size, 3), np.float32)
    label = np.ones((size, size), np.uint8)  # wall
    _paint(img, np.ones((size, size), bool), 1, rng)
    kinds = list(SHAPES)
    for _ in range(int(rng.integers(2, 5))):
        kind = kinds[int(rng.integers(len(kinds)))]
        mask = _shape_mask(kind, size, rng)
        _paint(img, mask, SHAPES[kind], rng)
        label[mask] = SHAPES[kind]
    # small "other" blobs: random colours, label 0 (ignored after reduce_zero_label)
    for _ in range(int(rng.integers(0, 3))):
        s = int(rng.integers(3, max(4, size // 12)))
        y, x = rng.integers(0, size - s, 2)
        img[y:y + s, x:x + s] = rng.uniform(0, 255, (s, s, 3))
        label[y:y + s, x:x + s] = 0
    return img.round().astype(np.uint8), label


def make_dataset(root: str, num_train: int = 48, num_val: int = 12, size: int = 128,
                 seed: int = 0) -> str:
    """Writes the dataset under `root` and returns the `ADEChallengeData2016` folder.

    Args:
        root: output folder (created).
        num_train / num_val: images per split.
        size: square image size in pixels.
        seed: random seed (same seed, same files).
    """
    import cv2  # opencv is what mmseg's loaders use; write with it too

    rng = np.random.default_rng(seed)
    base = os.path.join(root, "ADEChallengeData2016")
    for split, prefix, n in (("training", "train", num_train), ("validation", "val", num_val)):
        img_dir = os.path.join(base, "images", split)
        ann_dir = os.path.join(base, "annotations", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(n):
            img, label = make_sample(size, rng)
            name = f"ADE_{prefix}_{i + 1:08d}"
            # high JPEG quality: the textures should survive compression
            cv2.imwrite(os.path.join(img_dir, name + ".jpg"), img[..., ::-1],
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(os.path.join(ann_dir, name + ".png"), label)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="data/tiny_ade20k")
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--val", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = make_dataset(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} training and {args.val} validation images to {base}")


if __name__ == "__main__":
    main()
