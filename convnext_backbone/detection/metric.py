"""COCO box / mask AP through pycocotools' `COCOeval`, as an mmengine metric.

Predictions of `TorchvisionDetector(mode='predict')` are turned into COCO results
(`bbox` in xywh, `segmentation` as RLE of the mask thresholded at 0.5), written as
COCO-format JSON (`<prefix>.bbox.json`, `<prefix>.segm.json`) and scored by `COCOeval`
on the images that were predicted. Reported keys (with mmengine's `coco/` prefix):
`bbox_mAP`, `bbox_mAP_50`, `bbox_mAP_75`, `bbox_mAP_s`, `bbox_mAP_m`, `bbox_mAP_l`, and
the same for `segm`: the first six numbers of `COCOeval.stats`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger, print_log

from ..io_utils import atomic_write_text

__all__ = ["CocoMetric", "predictions_to_coco", "STAT_NAMES"]

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
_VALID = ("bbox", "segm")


def predictions_to_coco(pred: Dict[str, Any], label_to_cat_id: Dict[int, int],
                        with_masks: bool = True) -> Dict[str, List[Dict[str, Any]]]:
    """One image's torchvision prediction as COCO result entries.

    Args:
        pred: dict with `image_id`, `boxes` (N, 4) xyxy, `scores`, `labels` (1..K) and
            optionally `masks` (N, 1, H, W) probabilities.
        label_to_cat_id: contiguous label -> COCO category id.
        with_masks: also encode masks (RLE with `counts` as str, JSON-ready).

    Returns:
        {"bbox": [...], "segm": [...]}.
    """
    from pycocotools import mask as mask_utils

    image_id = int(pred["image_id"])
    boxes = torch.as_tensor(pred["boxes"]).detach().float().cpu().numpy().reshape(-1, 4)
    scores = torch.as_tensor(pred["scores"]).detach().float().cpu().numpy().reshape(-1)
    labels = torch.as_tensor(pred["labels"]).detach().cpu().numpy().reshape(-1)
    bbox, segm = [], []
    for box, score, label in zip(boxes, scores, labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        bbox.append(dict(image_id=image_id, category_id=int(label_to_cat_id[int(label)]),
                         bbox=[x1, y1, x2 - x1, y2 - y1], score=float(score)))
    if with_masks and pred.get("masks") is not None:
        masks = torch.as_tensor(pred["masks"]).detach().cpu()
        if masks.ndim == 4:
            masks = masks[:, 0]
        binary = np.asfortranarray((masks > 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(binary) if len(bbox) else []
        for entry, rle in zip(bbox, rles):
            rle["counts"] = rle["counts"].decode("ascii")
            segm.append(dict(image_id=image_id, category_id=entry["category_id"],
                             segmentation=rle, score=entry["score"]))
    return {"bbox": bbox, "segm": segm}


def _default_outfile_prefix() -> Optional[str]:
    # Next to the run's log (work_dir/<timestamp>/), where tools/test.py users look.
    try:
        log_file = getattr(MMLogger.get_current_instance(), "_log_file", None)
    except Exception:  # no logger yet
        log_file = None
    return os.path.join(os.path.dirname(log_file), "coco_results") if log_file else None


class CocoMetric(BaseMetric):
    """COCOeval box / mask AP for `TorchvisionDetector` predictions.

    Args:
        ann_file: the COCO instances JSON of the evaluated split.
        metric: "bbox", "segm" or both.
        outfile_prefix: where results JSON go (`<prefix>.bbox.json`, ...); None writes
            them next to the run's log as `coco_results.*.json` (or nowhere if no
            Runner logger exists).
        format_only: write the JSON and skip scoring (test-dev submissions).
        collect_device / prefix: mmengine `BaseMetric` arguments.
        data_root: optional prefix joined to a relative `ann_file` (as the dataset's).
    """

    default_prefix: Optional[str] = "coco"

    def __init__(self, ann_file: str, metric: Union[str, Sequence[str]] = ("bbox", "segm"),
                 outfile_prefix: Optional[str] = None, format_only: bool = False,
                 collect_device: str = "cpu", prefix: Optional[str] = None,
                 data_root: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if data_root:
            ann_file = os.path.join(data_root, ann_file)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        bad = [m for m in metrics if m not in _VALID]
        if bad or not metrics:
            raise ValueError(f"metric must be among {list(_VALID)}, got {metric!r}")
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file!r}")
        self.ann_file = ann_file
        self.metrics = metrics
        self.outfile_prefix = outfile_prefix
        self.format_only = format_only
        self._coco = None

    @property
    def coco(self):
        if self._coco is None:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(self.ann_file)
        return self._coco

    @property
    def label_to_cat_id(self) -> Dict[int, int]:
        # The dataset's mapping: contiguous labels follow sorted category ids.
        return {i + 1: cid for i, cid in enumerate(sorted(self.coco.getCatIds()))}

    def process(self, data_batch: Any, data_samples: Sequence[Dict[str, Any]]) -> None:
        mapping = self.label_to_cat_id
        for pred in data_samples:
            entries = predictions_to_coco(pred, mapping, with_masks="segm" in self.metrics)
            self.results.append(dict(image_id=int(pred["image_id"]), **entries))

    def write_results(self, results: List[Dict[str, Any]], prefix: str) -> Dict[str, str]:
        """Writes `<prefix>.<metric>.json` (atomically); returns {metric: path}."""
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        paths = {}
        for m in self.metrics:
            path = f"{prefix}.{m}.json"
            atomic_write_text(path, json.dumps([e for r in results for e in r[m]]))
            paths[m] = path
        return paths

    def compute_metrics(self, results: List[Dict[str, Any]]) -> Dict[str, float]:
        from pycocotools.cocoeval import COCOeval

        prefix = self.outfile_prefix or _default_outfile_prefix()
        tmp = None
        if prefix is None:
            tmp = tempfile.TemporaryDirectory()
            prefix = os.path.join(tmp.name, "results")
        paths = self.write_results(results, prefix)
        print_log(f"COCO results written to {sorted(paths.values())}", logger="current")
        if self.format_only:
            if tmp is not None:
                tmp.cleanup()
            return {}

        img_ids = sorted({r["image_id"] for r in results})
        print_log(f"COCOeval on {len(img_ids)} images", logger="current")
        out: Dict[str, float] = {}
        for m in self.metrics:
            dets = [e for r in results for e in r[m]]
            if not dets:
                # COCO.loadRes rejects an empty list; nothing predicted scores 0.
                print_log(f"no {m} predictions: {m} AP is 0", logger="current", level=30)
                out.update({f"{m}_{s}": 0.0 for s in STAT_NAMES})
                continue
            with contextlib.redirect_stdout(io.StringIO()) as buf:
                coco_dt = self.coco.loadRes(dets)
                evaluator = COCOeval(self.coco, coco_dt, m)
                evaluator.params.imgIds = img_ids
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            print_log(f"COCOeval {m}:\n{buf.getvalue()}", logger="current")
            out.update({f"{m}_{s}": round(float(v), 4) for s, v in zip(STAT_NAMES, evaluator.stats[:6])})
        if tmp is not None:
            tmp.cleanup()
        return out
