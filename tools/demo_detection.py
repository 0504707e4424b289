#!/usr/bin/env python
"""Trains a small ConvNeXt Mask R-CNN on a generated COCO-format dataset, on the CPU.

1. writes a tiny COCO-format dataset of shapes (tools/make_tiny_coco.py: images +
   instances JSON with polygon masks);
2. trains `configs/convnext/convnext-demo_mask-rcnn_fpn_1xb4-300it_tiny-shapes-128.py`
   (torchvision Mask R-CNN on a small ConvNeXt, mmengine Runner, AdamW + layer-wise
   LR decay) for `--iters` iterations;
3. evaluates on the validation split with pycocotools' COCOeval (box and mask AP) and
   writes COCO-format results JSON;
4. draws predictions (boxes, masks, labels, scores) on validation images into a PNG.

    python tools/demo_detection.py [--out-dir work_dirs/demo_detection] [--iters 300]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

CONFIG = os.path.join(ROOT, "configs", "convnext", "convnext-demo_mask-rcnn_fpn_1xb4-300it_tiny-shapes-128.py")


def build_cfg(data_root: str, work_dir: str, iters: int, config: str = CONFIG):
    """The demo config pointed at `data_root`, trained for `iters` iterations."""
    from mmengine.config import Config

    cfg = Config.fromfile(config)
    data_root = data_root.rstrip("/") + "/"
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[key].dataset.data_root = data_root
    for key in ("val_evaluator", "test_evaluator"):
        cfg[key].data_root = data_root
    cfg.test_evaluator.outfile_prefix = os.path.join(work_dir, "coco_results")
    cfg.work_dir = work_dir
    # Scale the schedule: warm-up, one LR step at 3/4, evaluation once at the end.
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=min(50, iters)),
        dict(type="MultiStepLR", by_epoch=False, begin=0, end=iters, milestones=[int(iters * 0.75)],
             gamma=0.1),
    ]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters,
                                        max_keep_ckpts=1)
    return cfg


def draw_predictions(model: Any, dataset: Any, path: str, num_images: int = 8,
                     score_thr: float = 0.5) -> int:
    """Draws boxes, masks and labels of predictions on validation images; returns #boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    num_images = min(num_images, len(dataset))
    cols = min(4, num_images)
    rows = (num_images + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    drawn = 0
    model.eval()
    with torch.no_grad():
        samples = [dataset[i] for i in range(num_images)]
        preds = model([s["inputs"] for s in samples], [s["data_samples"] for s in samples], mode="predict")
    for ax, sample, pred in zip(axes.flat, samples, preds):
        image = sample["inputs"].permute(1, 2, 0).numpy()
        overlay = image.copy()
        keep = pred["scores"] >= score_thr
        for box, label, score, mask in zip(pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep],
                                           pred["masks"][keep]):
            color = np.array(colors(int(label) % 10)[:3])
            m = mask[0].numpy() > 0.5
            overlay[m] = 0.5 * overlay[m] + 0.5 * color
            x1, y1, x2, y2 = box.tolist()
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.5))
            ax.text(x1, y1 - 2, f"{dataset.classes[int(label) - 1]} {float(score):.2f}", color="white",
                    fontsize=7, bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))
            drawn += 1
        ax.imshow(np.clip(overlay, 0, 1))
        ax.set_title(f"image {sample['data_samples']['image_id']}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return drawn


def run(out_dir: str, iters: int, num_train: int, num_val: int, seed: int = 0) -> Dict[str, Any]:
    import torch

    from make_tiny_coco import make_tiny_coco

    start = time.time()
    torch.manual_seed(seed)
    paths = make_tiny_coco(os.path.join(out_dir, "data"), num_train=num_train, num_val=num_val, seed=seed)
    from mmengine.runner import Runner

    cfg = build_cfg(paths["root"], os.path.join(out_dir, "work_dir"), iters)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    png = os.path.join(out_dir, "predictions.png")
    drawn = draw_predictions(runner.model, runner.test_dataloader.dataset, png)
    wall = time.time() - start
    summary = dict(iters=iters, box_AP=metrics.get("coco/bbox_mAP"), box_AP50=metrics.get("coco/bbox_mAP_50"),
                   mask_AP=metrics.get("coco/segm_mAP"), mask_AP50=metrics.get("coco/segm_mAP_50"),
                   predictions_png=png, boxes_drawn=drawn,
                   results_json=[os.path.join(cfg.work_dir, f"coco_results.{m}.json") for m in ("bbox", "segm")],
                   wall_time_s=round(wall, 1))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join("work_dirs", "demo_detection"))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--num-train", type=int, default=160)
    p.add_argument("--num-val", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = run(args.out_dir, args.iters, args.num_train, args.num_val, args.seed)
    print(f"\nConvNeXt Mask R-CNN on tiny COCO shapes after {summary['iters']} iterations "
          f"({summary['wall_time_s']:.0f} s): box AP {summary['box_AP']:.3f} "
          f"(AP50 {summary['box_AP50']:.3f}), mask AP {summary['mask_AP']:.3f} "
          f"(AP50 {summary['mask_AP50']:.3f}) [pycocotools COCOeval]")
    print(f"predictions drawn in {summary['predictions_png']}; results JSON {summary['results_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
