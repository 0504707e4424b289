#!/usr/bin/env python
"""Train a model from an mmengine config (mmsegmentation, mmdetection, ...) with mmengine's Runner.

Task-agnostic: what the config needs is imported through its `custom_imports` and
`default_scope` (the ConvNeXt configs import `convnext_backbone.mmseg`).

Usage:
    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options key=value ...] [--launcher none|pytorch|slurm|mpi]
    tools/dist_train.sh CONFIG NUM_GPUS [same options]     # torchrun, DDP

Checkpoints are written atomically and `--resume` works on torch >= 2.6 with
`weights_only=True` (see convnext_backbone.mmengine_utils).
"""
from __future__ import annotations

import argparse
import logging
import os.path as osp
import sys

# Running as `python tools/train.py` from a checkout: make the package importable.
_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from convnext_backbone.mmengine_utils import add_runner_args, finish_runner_args

    parser = argparse.ArgumentParser(description="Train a model with mmengine's Runner")
    parser.add_argument("config", help="config file path")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from CKPT, or with no value from the latest checkpoint "
                             "in the work dir")
    parser.add_argument("--amp", action="store_true",
                        help="automatic mixed precision (needs a GPU)")
    add_runner_args(parser)
    return finish_runner_args(parser.parse_args(argv))


def build_config(args: argparse.Namespace):
    from mmengine.logging import print_log

    from convnext_backbone.mmengine_utils import load_config, prepare_cpu_distributed

    cfg = load_config(args)  # imports cfg.custom_imports

    if args.amp:
        optim_type = cfg.optim_wrapper.get("type", "OptimWrapper")
        if optim_type == "AmpOptimWrapper":
            print_log("AMP is already enabled in the config", logger="current", level=logging.WARNING)
        elif optim_type != "OptimWrapper":
            raise ValueError(f"--amp replaces OptimWrapper by AmpOptimWrapper, but the config "
                             f"uses {optim_type!r}")
        else:
            if not torch.cuda.is_available():
                raise SystemExit("--amp needs a CUDA device (mmengine's AmpOptimWrapper)")
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    elif cfg.optim_wrapper.get("type") == "AmpOptimWrapper" and not torch.cuda.is_available():
        # The paper's configs use AMP, which mmengine supports on GPUs only: fp32 on a CPU.
        print_log("no CUDA device: AmpOptimWrapper -> OptimWrapper (fp32)", logger="current",
                  level=logging.WARNING)
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)

    if args.resume == "auto":
        from convnext_backbone.mmengine_utils import latest_checkpoint

        cfg.resume = True
        # Not mmengine's `last_checkpoint` alone: it lags the checkpoint it names.
        cfg.load_from = latest_checkpoint(cfg.work_dir)
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    prepare_cpu_distributed(cfg, args.launcher)
    return cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from convnext_backbone.mmengine_utils import destroy_process_group, setup_mmengine

    setup_mmengine()  # safe resume under weights_only=True, atomic checkpoint writes
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    runner.train()
    destroy_process_group()


if __name__ == "__main__":
    main()
