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
import os
import os.path as osp
import sys

# Running as `python tools/train.py` from a checkout: make the package importable.
_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description="Train a model with mmengine's Runner")
    parser.add_argument("config", help="config file path")
    parser.add_argument("--work-dir", help="where logs and checkpoints go "
                        "(default: ./work_dirs/CONFIG_NAME)")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from CKPT, or with no value from the latest checkpoint "
                             "in the work dir")
    parser.add_argument("--amp", action="store_true",
                        help="automatic mixed precision (needs a GPU)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, e.g. train_cfg.max_iters=1000")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def prepare_cpu_distributed(cfg, launcher: str) -> None:
    """Makes DDP work where there is no GPU: gloo backend, no device_ids.

    mmengine's `init_dist` calls `torch.cuda.set_device` and its default DDP wrapper passes
    `device_ids=[LOCAL_RANK]`, both of which fail on CPU; so the process group is created
    here (mmengine then skips its own) and the wrapper gets `device_ids=None`.
    """
    if launcher == "none" or torch.cuda.is_available():
        return
    import torch.distributed as dist

    cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
    if launcher == "pytorch" and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    wrapper.setdefault("type", "MMDistributedDataParallel")
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper


def _destroy_process_group() -> None:
    """Tears the process group down before exit; without it gloo ranks can abort at exit
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_config(args: argparse.Namespace):
    from mmengine.config import Config
    from mmengine.logging import print_log

    cfg = Config.fromfile(args.config)  # imports cfg.custom_imports
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])

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

    from convnext_backbone.mmengine_utils import setup_mmengine

    setup_mmengine()  # safe resume under weights_only=True, atomic checkpoint writes
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    runner.train()
    _destroy_process_group()


if __name__ == "__main__":
    main()
