"""mmengine on today's PyTorch: safe resume and atomic checkpoint writes.

1. `enable_safe_resume()`: since torch 2.6, `torch.load` defaults to `weights_only=True`
   and mmengine 0.10.7's own checkpoints no longer load (its `MessageHub` stores
   `HistoryBuffer` objects holding numpy arrays, and each buffer pickles its statistics
   methods as `getattr(HistoryBuffer, 'min')`). Instead of turning `weights_only` off, this
   allow-lists exactly the globals mmengine writes (`safe_globals()`), and stands in for
   `builtins.getattr` with a function that resolves only HistoryBuffer's four statistics
   methods and refuses everything else.
2. `enable_atomic_checkpoints()`: mmengine writes checkpoints and the `last_checkpoint`
   pointer with a plain `open(path, 'wb')`, so a run killed mid-write leaves a truncated
   file that `--resume` then fails on. This makes mmengine's local file backend write to a
   temporary file in the same folder and `os.replace` it over the target.

`setup_mmengine()` does both; `convnext_backbone.mmseg` and `tools/train.py` call it.

What `tools/train.py` and `tools/test.py` share is here too: their runner arguments
(`add_runner_args`, `finish_runner_args`), loading a config with them (`load_config`), and
DDP on machines without a GPU (`prepare_cpu_distributed`, `destroy_process_group`).
"""
from __future__ import annotations

import argparse
import builtins
import os
import os.path as osp
import pickle
import re
from typing import Any, List, Optional, Tuple, Union

import torch

__all__ = ["safe_globals", "enable_safe_resume", "enable_atomic_checkpoints",
           "skip_pretrained_files", "setup_mmengine", "restricted_getattr", "latest_checkpoint",
           "add_runner_args", "finish_runner_args", "load_config", "prepare_cpu_distributed",
           "destroy_process_group"]

# (owner, attribute) pairs `restricted_getattr` may resolve: HistoryBuffer's default
# statistics methods, which its __getstate__ pickles by reference.
_GETATTR_ALLOWED = {("mmengine.logging.history_buffer.HistoryBuffer", "min"),
                    ("mmengine.logging.history_buffer.HistoryBuffer", "max"),
                    ("mmengine.logging.history_buffer.HistoryBuffer", "current"),
                    ("mmengine.logging.history_buffer.HistoryBuffer", "mean")}


def restricted_getattr(obj: Any, name: str) -> Any:
    """`getattr` limited to HistoryBuffer.min/max/current/mean (what mmengine pickles)."""
    owner = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if (owner, name) not in _GETATTR_ALLOWED:
        # An UnpicklingError, so callers report it like any other refused global.
        raise pickle.UnpicklingError(
            f"checkpoint asks for getattr({owner!r}, {name!r}); only "
            f"{sorted(n for _, n in _GETATTR_ALLOWED)} of HistoryBuffer are allowed in a "
            f"weights_only load")
    return builtins.getattr(obj, name)


def safe_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """The globals (and `(object, "name in the pickle")` aliases) an mmengine checkpoint
    needs, in the form `torch.serialization.add_safe_globals` takes."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:
        core = np._core.multiarray  # numpy >= 2
        core_name = "numpy._core.multiarray"
    except AttributeError:  # numpy 1.x
        core = np.core.multiarray
        core_name = "numpy.core.multiarray"
    other_core = "numpy.core.multiarray" if core_name == "numpy._core.multiarray" else "numpy._core.multiarray"
    out: List[Union[Any, Tuple[Any, str]]] = [
        HistoryBuffer,
        # numpy arrays and scalars inside HistoryBuffer / runtime info
        core._reconstruct, np.ndarray, np.dtype, core.scalar,
        # checkpoints written under the other numpy major version
        (core._reconstruct, f"{other_core}._reconstruct"), (core.scalar, f"{other_core}.scalar"),
        # the pickled statistics methods: getattr(HistoryBuffer, 'min'), restricted
        (restricted_getattr, "builtins.getattr"), (restricted_getattr, "__builtin__.getattr"),
    ]
    # numpy >= 1.25 pickles a dtype through its class (np.dtypes.Float64DType, ...).
    dtypes_mod = getattr(np, "dtypes", None)
    if dtypes_mod is not None:
        for dt in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                   np.uint8, np.bool_):
            out.append(type(np.dtype(dt)))
    return out


_SAFE_RESUME_ENABLED = False
_ATOMIC_ENABLED = False


def enable_safe_resume() -> None:
    """Allow-lists mmengine's checkpoint globals for `weights_only=True` loads (idempotent).

    `weights_only` stays on: nothing but these globals is allowed."""
    global _SAFE_RESUME_ENABLED
    if _SAFE_RESUME_ENABLED:
        return
    if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
        torch.serialization.add_safe_globals(safe_globals())
    _SAFE_RESUME_ENABLED = True


def enable_atomic_checkpoints() -> None:
    """Makes mmengine's local file writes (checkpoints, `last_checkpoint`) atomic (idempotent)."""
    global _ATOMIC_ENABLED
    if _ATOMIC_ENABLED:
        return
    from mmengine.fileio.backends.local_backend import LocalBackend

    from .io_utils import atomic_write

    def put(self: Any, obj: bytes, filepath: Any) -> None:
        def _write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(obj)
        atomic_write(filepath, _write)

    def put_text(self: Any, obj: str, filepath: Any, encoding: str = "utf-8") -> None:
        def _write(tmp: str) -> None:
            with open(tmp, "w", encoding=encoding) as f:
                f.write(obj)
        atomic_write(filepath, _write)

    put.__doc__ = "Atomic `LocalBackend.put` (temporary file + os.replace; convnext_backbone)."
    put_text.__doc__ = "Atomic `LocalBackend.put_text` (temporary file + os.replace; convnext_backbone)."
    LocalBackend.put = put  # type: ignore[assignment]
    LocalBackend.put_text = put_text  # type: ignore[assignment]
    _ATOMIC_ENABLED = True


_CHECKPOINT_NAME = re.compile(r"^(?:iter|epoch)_(\d+)\.pth$")


def latest_checkpoint(work_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The checkpoint `--resume` should continue from: the highest-numbered `iter_N.pth` /
    `epoch_N.pth` in `work_dir`, else the file `last_checkpoint` names, else None.

    mmengine writes `last_checkpoint` only after the checkpoint itself, so a run killed in
    between leaves it pointing at an older checkpoint (or missing, after the first one);
    checkpoints are written atomically, so any one present is complete."""
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        return None
    numbered = [(int(m.group(1)), name) for name in os.listdir(work_dir)
                if (m := _CHECKPOINT_NAME.match(name))]
    if numbered:
        return os.path.join(work_dir, max(numbered)[1])
    pointer = os.path.join(work_dir, "last_checkpoint")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            return f.read().strip() or None
    return None


def setup_mmengine() -> None:
    """`enable_safe_resume()` and `enable_atomic_checkpoints()`."""
    enable_safe_resume()
    enable_atomic_checkpoints()


def skip_pretrained_files(cfg: Any) -> None:
    """Makes `cfg.model` build without reading ImageNet weights (the caller loads a
    trained checkpoint, or needs none): the segmentor's `backbone.init_cfg` and the
    detector's `checkpoint` argument."""
    model = cfg.get("model")
    if not isinstance(model, dict):
        return
    if isinstance(model.get("backbone"), dict):
        model["backbone"]["init_cfg"] = None
    if "checkpoint" in model:
        model["checkpoint"] = None


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """The options every runner tool takes: --work-dir, --cfg-options, --launcher and the
    --local-rank that torch.distributed.launch passes."""
    from mmengine.config import DictAction

    parser.add_argument("--work-dir", help="where logs and checkpoints go "
                        "(default: ./work_dirs/CONFIG_NAME)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, e.g. train_cfg.max_iters=1000")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def finish_runner_args(args: argparse.Namespace) -> argparse.Namespace:
    """Exports --local-rank as LOCAL_RANK where the launcher did not set it."""
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def load_config(args: argparse.Namespace) -> Any:
    """`args.config` read (importing its `custom_imports`) with the runner options applied:
    the launcher, --cfg-options, and the work dir (default ./work_dirs/CONFIG_NAME)."""
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg


def prepare_cpu_distributed(cfg: Any, launcher: str) -> None:
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


def destroy_process_group() -> None:
    """Tears the process group down before exit; without it gloo ranks can abort at exit
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
