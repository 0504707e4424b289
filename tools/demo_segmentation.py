#!/usr/bin/env python
"""End-to-end demo on a CPU: tiny ADE20K-format dataset -> train a small ConvNeXt UperNet
-> evaluate (mIoU) -> PNGs of the training curve and of predictions.

Runs through the same pieces as a real run: tools/make_tiny_ade20k.py writes the data,
mmengine's Runner trains `configs/convnext/convnext-demo_upernet_1xb8-1000it_tiny-ade20k-128x128.py`
(mmseg's ADE20KDataset, transforms, UPerHead, IoUMetric, this package's ConvNeXt and LR
decay), and the validation metrics are mmseg's.

Usage:
    python tools/demo_segmentation.py [--out-dir DIR] [--iters N]

Writes into DIR (default: demo_out/segmentation): data/, work_dir/ (logs, checkpoints),
curves.png (training loss and validation mIoU), predictions.png (image | ground truth |
prediction on validation images) and metrics.json. The last line printed is the mIoU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import sys
import time
from typing import Any, Dict, List

_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

DEMO_CONFIG = osp.join(_REPO, "configs", "convnext",
                       "convnext-demo_upernet_1xb8-1000it_tiny-ade20k-128x128.py")


def read_scalars(log_dir: str) -> List[Dict[str, Any]]:
    """Records of mmengine's LocalVisBackend (`vis_data/scalars.json`), oldest first."""
    records: List[Dict[str, Any]] = []
    for path in sorted(glob.glob(osp.join(log_dir, "vis_data", "scalars.json"))):
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def plot_curves(records: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["mIoU"]) for r in records if "mIoU" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train), color="tab:blue")
    ax1.set(xlabel="iteration", ylabel="training loss", title="Training loss")
    ax1.grid(alpha=0.3)
    if val:
        ax2.plot(*zip(*val), marker="o", color="tab:green")
    ax2.set(xlabel="iteration", ylabel="mIoU (%)", title="Validation mIoU", ylim=(0, 100))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_predictions(runner: Any, path: str, num: int = 4) -> None:
    """image | ground truth | prediction for the first `num` validation images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from mmcv import imread

    from make_tiny_ade20k import CLASSES

    # colours: the demo classes after reduce_zero_label (id - 1); ignore (255) black
    palette = np.zeros((256, 3), np.uint8)
    for label_id, (_, colour, _) in CLASSES.items():
        palette[label_id - 1] = colour
    model = runner.model
    model.eval()
    samples = []
    with torch.no_grad():
        for batch in runner.val_dataloader:
            samples += model.val_step(batch)
            if len(samples) >= num:
                break
    samples = samples[:num]
    fig, axes = plt.subplots(len(samples), 3, figsize=(7.5, 2.5 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples):
        img = imread(sample.img_path, channel_order="rgb")
        gt = sample.gt_sem_seg.data[0].cpu().numpy().astype(np.int64)
        pred = sample.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)
        overlay = (0.35 * img + 0.65 * palette[pred]).astype(np.uint8)
        for ax, im, title in zip(row, (img, palette[np.clip(gt, 0, 255)], overlay),
                                 ("image", "ground truth", "prediction (overlay)")):
            ax.imshow(im)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(out_dir: str, iters: int = 0, num_train: int = 48, num_val: int = 12,
             size: int = 128, seed: int = 0) -> Dict[str, Any]:
    """Runs the demo; returns the metrics (mIoU in %, as mmseg reports it) and paths.

    Args:
        out_dir: output folder.
        iters: training iterations (0: the config's).
        num_train / num_val / size / seed: the generated dataset.
    """
    from mmengine.config import Config
    from mmengine.runner import Runner

    from convnext_backbone.mmengine_utils import setup_mmengine
    from make_tiny_ade20k import make_dataset

    start = time.time()
    setup_mmengine()
    data_root = make_dataset(osp.join(out_dir, "data"), num_train, num_val, size, seed)
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.work_dir = osp.join(out_dir, "work_dir")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = data_root
    if iters:
        cfg.train_cfg.max_iters = iters
        cfg.train_cfg.val_interval = max(1, iters // 3)
        cfg.param_scheduler[-1].end = iters
        cfg.default_hooks.checkpoint.interval = iters
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = {k: float(v) for k, v in runner.val_loop.run().items()}
    records = read_scalars(runner.log_dir)
    curves, preds = osp.join(out_dir, "curves.png"), osp.join(out_dir, "predictions.png")
    plot_curves(records, curves)
    plot_predictions(runner, preds)
    result = {
        "mIoU": metrics.get("mIoU"), "mAcc": metrics.get("mAcc"), "aAcc": metrics.get("aAcc"),
        "iterations": cfg.train_cfg.max_iters, "wall_time_s": round(time.time() - start, 1),
        "checkpoint": osp.join(cfg.work_dir, f"iter_{cfg.train_cfg.max_iters}.pth"),
        "curves_png": curves, "predictions_png": preds,
        "val_mIoU_history": [(r["step"], r["mIoU"]) for r in records if "mIoU" in r],
    }
    from convnext_backbone.io_utils import atomic_write_text

    atomic_write_text(osp.join(out_dir, "metrics.json"), json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=osp.join("demo_out", "segmentation"))
    parser.add_argument("--iters", type=int, default=0, help="training iterations (default: the config's 1000)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    result = run_demo(args.out_dir, iters=args.iters, seed=args.seed)
    print(f"wrote {result['curves_png']} and {result['predictions_png']}")
    print(f"trained {result['iterations']} iterations in {result['wall_time_s']:.0f} s; "
          f"validation aAcc {result['aAcc']:.2f}  mAcc {result['mAcc']:.2f}")
    print(f"mIoU: {result['mIoU']:.2f}")
    return result


if __name__ == "__main__":
    main()
