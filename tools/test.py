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
import os.path as osp
import sys

# Running as `python tools/test.py` from a checkout: make the package importable.
_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def parse_args(argv=None) -> argparse.Namespace:
    from convnext_backbone.mmengine_utils import add_runner_args, finish_runner_args

    parser = argparse.ArgumentParser(description="Evaluate a checkpoint with mmengine's Runner")
    parser.add_argument("config", help="config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation")
    parser.add_argument("--out-json", help="also write the metrics to this JSON file")
    add_runner_args(parser)
    return finish_runner_args(parser.parse_args(argv))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from convnext_backbone.mmengine_utils import (destroy_process_group, load_config,
                                                  prepare_cpu_distributed, setup_mmengine,
                                                  skip_pretrained_files)

    setup_mmengine()  # checkpoints load with weights_only=True
    cfg = load_config(args)
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
    destroy_process_group()
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
