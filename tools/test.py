#!/usr/bin/env python
"""Evaluate a checkpoint with mmengine's Runner (task-agnostic, like tools/train.py).

For the ADE20K configs the metrics are mmseg's `IoUMetric`: aAcc, mIoU, mAcc.

Usage:
    python tools/test.py CONFIG CHECKPOINT [--tta] [--work-dir DIR] [--out-json FILE]
                         [--cfg-options key=value ...] [--launcher none|pytorch|slurm|mpi]

`--tta` is multi-scale + flip testing (the config's `tta_pipeline` and `tta_model`).
The last line printed is `METRICS {json}`.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import _destroy_process_group, prepare_cpu_distributed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description="Evaluate a checkpoint with mmengine's Runner")
    parser.add_argument("config", help="config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="where logs go (default: ./work_dirs/CONFIG_NAME)")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation")
    parser.add_argument("--out-json", help="also write the metrics to this JSON file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, e.g. test_dataloader.batch_size=1")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from convnext_backbone.mmengine_utils import setup_mmengine, skip_pretrained_files

    setup_mmengine()  # checkpoints load with weights_only=True
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    skip_pretrained_files(cfg)  # the weights come from the checkpoint
    if args.tta:
        if "tta_model" not in cfg or "tta_pipeline" not in cfg:
            raise SystemExit(f"--tta needs `tta_model` and `tta_pipeline` in {args.config}")
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    prepare_cpu_distributed(cfg, args.launcher)

    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    metrics = runner.test()
    from mmengine.dist import get_rank

    is_main = get_rank() == 0  # read before the process group is gone
    _destroy_process_group()
    metrics = {k: float(v) for k, v in metrics.items()}
    if not is_main:  # every rank has the same (all-gathered) metrics; one reports them
        return metrics
    if args.out_json:
        from convnext_backbone.io_utils import atomic_write_text

        atomic_write_text(args.out_json, json.dumps(metrics, indent=2) + "\n")
    print("METRICS " + json.dumps(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    main()
