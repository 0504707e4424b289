"""COCO instance data for torchvision detectors: dataset, transforms, collate.

Images come out as float tensors in [0, 1] (torchvision's `GeneralizedRCNNTransform`
normalises and resizes them; the paper's multi-scale resize, short side 480..800 and
long side <= 1333, is the detector's `min_size=MULTISCALE_MIN_SIZES, max_size=1333`, so
predictions come back in original image coordinates for COCOeval). Targets follow
torchvision's contract: `boxes` (N, 4) xyxy float, `labels` (N,) int64 in 1..K
(0 is background), `masks` (N, H, W) uint8, plus `image_id`.

Crowd annotations (`iscrowd=1`, usually RLE) are left out of the training targets, as
torchvision has no ignore regions; COCOeval still sees them through the annotation file.
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["CocoInstanceDataset", "RandomHorizontalFlip", "Compose", "detection_collate",
           "build_transforms"]

Sample = Dict[str, Any]


class RandomHorizontalFlip:
    """Flips image, boxes and masks left-right with probability `prob`.

    Args:
        prob: flip probability in [0, 1].
    """

    def __init__(self, prob: float = 0.5) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, image: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if random.random() >= self.prob:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        if "boxes" in target and target["boxes"].numel():
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        target["flipped"] = True
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


class Compose:
    """Applies `(image, target) -> (image, target)` transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


_TRANSFORMS = {"RandomHorizontalFlip": RandomHorizontalFlip}


def build_transforms(cfgs: Optional[Sequence[Any]]) -> Optional[Compose]:
    """Builds a `Compose` from callables or dicts like `dict(type='RandomHorizontalFlip', prob=0.5)`."""
    if not cfgs:
        return None
    out = []
    for cfg in cfgs:
        if callable(cfg):
            out.append(cfg)
            continue
        cfg = dict(cfg)
        kind = cfg.pop("type", None)
        if kind not in _TRANSFORMS:
            raise ValueError(f"unknown detection transform {kind!r}; valid: {sorted(_TRANSFORMS)}")
        out.append(_TRANSFORMS[kind](**cfg))
    return Compose(out)


class CocoInstanceDataset(torch.utils.data.Dataset):
    """COCO `instances_*.json` + image folder, read through pycocotools.

    Category ids are mapped to contiguous labels 1..K in sorted id order
    (`label_to_cat_id` gives the way back); polygon and RLE masks are decoded with
    `COCO.annToMask`.

    Args:
        ann_file: path of the COCO instances JSON.
        img_dir: folder the images' `file_name`s are relative to.
        transforms: `(image, target)` callables or dicts (see `build_transforms`);
            the paper's training set-up is `[dict(type='RandomHorizontalFlip', prob=0.5)]`
            with the detector's multi-scale `min_size`.
        test_mode: skip annotations (inference / evaluation through the annotation file).
        with_masks: decode instance masks (Mask R-CNN); False for box-only detectors.
        filter_empty_gt: drop images without usable (non-crowd) annotations, as mmdet
            does for training; ignored in `test_mode`.
        data_root: optional prefix joined to relative `ann_file` / `img_dir`.
    """

    def __init__(self, ann_file: str, img_dir: str, transforms: Optional[Sequence[Any]] = None,
                 test_mode: bool = False, with_masks: bool = True, filter_empty_gt: bool = True,
                 data_root: Optional[str] = None) -> None:
        from pycocotools.coco import COCO

        if data_root:
            ann_file = os.path.join(data_root, ann_file)
            img_dir = os.path.join(data_root, img_dir)
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file!r}")
        self.ann_file = ann_file
        self.img_dir = img_dir
        self.test_mode = test_mode
        self.with_masks = with_masks
        self.transforms = build_transforms(transforms)
        self.coco = COCO(ann_file)
        self.cat_ids: List[int] = sorted(self.coco.getCatIds())
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: cid for i, cid in enumerate(self.cat_ids)}
        self.classes = tuple(self.coco.loadCats(cid)[0]["name"] for cid in self.cat_ids)
        img_ids = sorted(self.coco.getImgIds())
        if filter_empty_gt and not test_mode:
            img_ids = [i for i in img_ids if self._usable_anns(i)]
        self.img_ids = img_ids

    @property
    def metainfo(self) -> Dict[str, Any]:
        """What mmengine hands to metrics as `dataset_meta`."""
        return dict(classes=self.classes, cat_ids=list(self.cat_ids))

    @property
    def num_classes(self) -> int:
        """Classes including background (torchvision's `num_classes`)."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self.img_ids)

    def _usable_anns(self, img_id: int) -> List[Dict[str, Any]]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id], iscrowd=None))
        # torchvision rejects degenerate boxes; crowd regions have no training target.
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def load_image(self, img_id: int) -> torch.Tensor:
        from PIL import Image

        info = self.coco.loadImgs(img_id)[0]
        with Image.open(os.path.join(self.img_dir, info["file_name"])) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, img_id: int) -> Dict[str, Any]:
        """torchvision target of one image (no transform)."""
        info = self.coco.loadImgs(img_id)[0]
        height, width = int(info["height"]), int(info["width"])
        target: Dict[str, Any] = dict(image_id=int(img_id), orig_size=(height, width))
        if self.test_mode:
            return target
        anns = self._usable_anns(img_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target["boxes"] = boxes
        target["labels"] = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns],
                                        dtype=torch.int64)
        target["area"] = torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32)
        target["iscrowd"] = torch.zeros(len(anns), dtype=torch.int64)
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, height, width), dtype=torch.uint8))
        return target

    def __getitem__(self, index: int) -> Sample:
        img_id = self.img_ids[index]
        image = self.load_image(img_id)
        target = self.load_target(img_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return dict(inputs=image, data_samples=target)


def detection_collate(batch: Sequence[Sample]) -> Dict[str, List[Any]]:
    """Keeps images of different sizes as a list (torchvision detectors batch them)."""
    return dict(inputs=[b["inputs"] for b in batch], data_samples=[b["data_samples"] for b in batch])
