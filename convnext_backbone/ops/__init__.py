"""Fused fast path of the ConvNeXt block (Triton kernels + torch custom ops).

`ConvNextBlock.forward` calls `use_fast_path(block, x)` and, when it says yes, runs
`block_forward(block, x)`; otherwise the pure-PyTorch reference code. Nothing for the
user to do: the fast path is taken for CUDA tensors when Triton imports, for V1 blocks
(layer scale on, exact GELU, no GRN) and when drop path is inactive; everything else
(CPU, ONNX export, torch.fx tracing, TorchScript, V2/GRN, other activations) runs the
reference path. On CPU, fp32 inference blocks (no autograd) run their pointwise layers
through oneDNN's fused linear ops instead (`use_cpu_path`, `convnext_backbone.ops.cpu`).
The blocks' depthwise 7x7 convs run this package's CUDA kernel (`cuda_dwconv`, built at
run time by NVRTC) for half-precision input, cuDNN otherwise. `LayerNorm2d` (stem,
downsampling, output norms) takes Triton kernels for channels_last CUDA tensors in eager
mode (`use_fast_layer_norm`), and under half-precision autocast the model's whole stem
(patch conv + LayerNorm) is one Triton kernel (`use_fast_stem`,
`convnext_backbone.ops.stem`). Parameter names and checkpoints are the same on both paths.

Switches (for benchmarks and debugging):
  - environment variable ``CONVNEXT_FAST_PATH=0`` turns the fast path off (read at import
    and by `refresh_from_env()`);
  - ``with convnext_backbone.ops.fast_path(False): ...`` turns it off (or on) in a block;
  - ``CONVNEXT_FAST_PATH_MIN_TRAIN_ELEMENTS`` (default 4194304): training blocks whose
    input has fewer elements (batch x channels x height x width) take the reference path
    (`MIN_TRAIN_ELEMENTS`; ``fast_path(min_train_elements=0)`` in a block, e.g. around a
    CUDA graph's warm-up and capture, where no host time is spent issuing kernels);
  - ``CONVNEXT_DWCONV=cuda|cudnn|triton`` picks the depthwise-conv kernels (default cuda).
    Under torch.compile the setting in force when the graph is traced is baked into it.

This module imports only torch; Triton is imported on first use, NVRTC and the CUDA
driver are loaded (ctypes) on the first half-precision CUDA conv.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["fast_path", "fast_path_enabled", "fast_path_available", "use_fast_path",
           "block_forward", "use_cpu_path", "cpu_block_forward", "block_supported",
           "refresh_from_env", "compute_dtype", "needs_backward", "use_fast_layer_norm",
           "layer_norm_2d", "submodules_plain", "drop_path_active", "block_sequence",
           "in_block_sequence", "use_fast_stem", "stem_forward", "attach_low_precision_copy",
           "discard_low_precision_copy", "use_fast_downsample", "downsample_forward"]


def _env_enabled() -> bool:
    return os.environ.get("CONVNEXT_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no")


_ENABLED = _env_enabled()
# Under torch.compile the reference path is the default for training: Inductor fuses
# LayerNorm, GELU, layer scale and the residual into the matmuls' neighbours and their
# backward, which the opaque custom ops prevent (measured on an H100: 0.76x timm+compile
# with the ops, ~1x without). Inference blocks whose MLP the fused kernel covers (half
# precision, C <= 256) still take it: it keeps the 4C-wide activation off memory, which
# Inductor cannot. CONVNEXT_FAST_PATH_COMPILE=1 (or fast_path(True, under_compile=True))
# uses the custom ops for every supported block under compile.
_UNDER_COMPILE = os.environ.get("CONVNEXT_FAST_PATH_COMPILE", "0").strip().lower() in ("1", "true", "on", "yes")
_TRITON_OK: Optional[bool] = None
# Training blocks whose input has fewer elements (N*C*H*W) than this take the reference
# path: the GPU time the fused block saves grows with its elements, its kernel launches
# (Python-issued) cost the same host time at any size, and small-batch detection steps are
# host-bound. 2^22 keeps the reference path for batch-2 800x1333 detection's stages 3-4
# (3.2M and 1.6M elements) and fuses a 32x512^2 step's stage 4 (6.3M; its reference blocks
# held 0.3 GB more at the step's peak).
MIN_TRAIN_ELEMENTS = int(os.environ.get("CONVNEXT_FAST_PATH_MIN_TRAIN_ELEMENTS", str(2**22)))
if "CONVNEXT_FAST_PATH_MIN_TRAIN_PIXELS" in os.environ:
    warnings.warn("CONVNEXT_FAST_PATH_MIN_TRAIN_PIXELS is ignored: the threshold counts "
                  "elements now (batch x channels x height x width); set "
                  "CONVNEXT_FAST_PATH_MIN_TRAIN_ELEMENTS instead", FutureWarning)
# Triton's interpreter runs the kernels on CPU tensors: lets CPU-only CI check the kernels'
# arithmetic (slowly, on tiny shapes). Read once at import, like Triton itself does.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The attribute under which a tensor carries its compute-dtype copy for the next block's
# depthwise conv (`ops.block`), with the version of the tensor it was made from.
_LOW_PRECISION_ATTR = "_convnext_low_precision_copy"


def attach_low_precision_copy(t: torch.Tensor, copy: torch.Tensor) -> None:
    """Hands `copy` (t in the compute dtype) to the next block that convolves `t`."""
    t.__dict__[_LOW_PRECISION_ATTR] = (copy, None if t.is_inference() else t._version)


def discard_low_precision_copy(t: torch.Tensor) -> None:
    """Drops a copy that no block took, so that a returned tensor does not keep it alive."""
    if not torch.compiler.is_compiling():  # none is made under compile
        t.__dict__.pop(_LOW_PRECISION_ATTR, None)


# Depth of `block_sequence` contexts on this thread.
_SEQUENCE = threading.local()


@contextlib.contextmanager
def block_sequence() -> Iterator[None]:
    """Marks a stage's own loop over its blocks (the model's `_run_blocks`): inside it, a
    block's output goes straight to the next block, so the fast path may hand the next
    block a compute-dtype copy of it even for inference-mode tensors, which have no version
    counter to show a change in between (see `ops.block`)."""
    _SEQUENCE.depth = getattr(_SEQUENCE, "depth", 0) + 1
    try:
        yield
    finally:
        _SEQUENCE.depth -= 1


def in_block_sequence() -> bool:
    """Whether a `block_sequence` is running on this thread."""
    return getattr(_SEQUENCE, "depth", 0) > 0


def refresh_from_env() -> bool:
    """Re-reads ``CONVNEXT_FAST_PATH``; returns whether the fast path is enabled."""
    global _ENABLED
    _ENABLED = _env_enabled()
    return _ENABLED


def fast_path_enabled() -> bool:
    """Whether the fast path is switched on (it still needs CUDA and Triton)."""
    return _ENABLED


@contextlib.contextmanager
def fast_path(enabled: bool = True, under_compile: Optional[bool] = None,
              min_train_elements: Optional[int] = None) -> Iterator[None]:
    """Context manager that switches the fast path on or off, restoring it afterwards.

    Args:
        enabled: False forces the pure-PyTorch reference path.
        under_compile: True also uses the fused ops inside torch.compile (default: the
            reference path there, which Inductor fuses better); None keeps the setting.
        min_train_elements: training blocks whose input has fewer elements take the
            reference path (`MIN_TRAIN_ELEMENTS`). 0 sends every training block through
            the fused kernels: right for a CUDA graph (capture the step and its warm-up
            inside this context), whose replays cost no host time per kernel. None keeps
            the setting.
    """
    global _ENABLED, _UNDER_COMPILE, MIN_TRAIN_ELEMENTS
    if min_train_elements is not None and (isinstance(min_train_elements, bool)
                                           or not isinstance(min_train_elements, int)
                                           or min_train_elements < 0):
        raise ValueError(f"min_train_elements must be a non-negative int or None, "
                         f"got {min_train_elements!r}")
    prev = _ENABLED, _UNDER_COMPILE, MIN_TRAIN_ELEMENTS
    _ENABLED = bool(enabled)
    if under_compile is not None:
        _UNDER_COMPILE = bool(under_compile)
    if min_train_elements is not None:
        MIN_TRAIN_ELEMENTS = min_train_elements
    try:
        yield
    finally:
        _ENABLED, _UNDER_COMPILE, MIN_TRAIN_ELEMENTS = prev


def _triton_ok() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        ok = importlib.util.find_spec("triton") is not None and (
            torch.cuda.is_available() or _INTERPRET)
        if ok:
            try:
                from . import _kernels  # noqa: F401  (compiles nothing yet; checks the import)
                from . import block  # noqa: F401  (registers the custom ops)
            except Exception:  # noqa: BLE001 - a broken Triton install means "no fast path"
                ok = False
        _TRITON_OK = ok
    return _TRITON_OK


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (and with
# it Triton) when this package is imported: dynamo calls the function once at trace time.
_triton_ok._dynamo_marked_constant = True  # type: ignore[attr-defined]


def fast_path_available(x: torch.Tensor) -> bool:
    """Whether a tensor like `x` would take the fast path (ignoring the block's options)."""
    # The kernels index with int32 offsets.
    return (_ENABLED and (x.is_cuda or (_INTERPRET and x.device.type == "cpu")) and x.dim() == 4
            and x.is_floating_point()
            and x.numel() < 2**31 and _triton_ok())


# Submodules a fast path computes itself instead of calling: they must be the plain torch
# layers (not quantized, QAT-wrapped or LoRA-wrapped replacements) and carry no hooks
# (observers, FLOP counters), which would otherwise silently not run.
_PLAIN_LAYER_TYPES = {"dwconv": nn.Conv2d, "norm": nn.LayerNorm, "pwconv1": nn.Linear,
                      "pwconv2": nn.Linear}


def _global_hooks() -> bool:
    """Whether global module hooks are registered."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _hooked(m: nn.Module) -> bool:
    """Whether `m` has module hooks of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _no_hooks(*modules: nn.Module) -> bool:
    """No module hooks on `modules`, and no global module hooks."""
    return not (_global_hooks() or any(_hooked(m) for m in modules))


def submodules_plain(block: nn.Module, names) -> bool:
    """Whether `block`'s submodules `names` are plain layers without hooks (and no global
    module hooks are registered)."""
    if _global_hooks():
        return False
    # Called for every block of every forward: the registry itself rather than getattr
    # (Module.__getattr__ is Python), one pass.
    modules = block._modules
    for name in names:
        sub = modules.get(name)
        if sub is None:
            continue
        if _hooked(sub):
            return False
        expected = _PLAIN_LAYER_TYPES.get(name)
        if expected is not None and type(sub) is not expected:
            return False
    return True


def _plain_autograd(x: torch.Tensor) -> bool:
    """Not under forward-mode AD or a functorch transform (jvp, vmap, grad): the fused ops
    have no rules for those, the reference path does."""
    return (torch.autograd.forward_ad._current_level < 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def drop_path_active(block: nn.Module) -> bool:
    """Whether the block's stochastic depth would drop samples (training, rate > 0)."""
    return block.training and getattr(getattr(block, "drop_path", None), "drop_prob", 0.0) > 0


def block_supported(block: nn.Module) -> bool:
    """Whether a `ConvNextBlock`'s options are covered by the fused kernels."""
    modules = block._modules  # submodules live here (getattr would go through Python)
    act = modules.get("act")
    dw = modules.get("dwconv")
    gamma = block._parameters.get("gamma")
    if gamma is None:  # a buffer, a plain attribute or None
        gamma = getattr(block, "gamma", None)
    return (getattr(block, "grn", None) is None and gamma is not None
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and isinstance(dw, nn.Conv2d) and tuple(dw.kernel_size) == (7, 7)
            and tuple(dw.padding) == (3, 3) and tuple(dw.stride) == (1, 1)
            and tuple(dw.dilation) == (1, 1) and dw.groups == dw.in_channels == dw.out_channels
            and dw.bias is not None and not drop_path_active(block)
            and submodules_plain(block, ("dwconv", "norm", "pwconv1", "act", "pwconv2")))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block's products run in: autocast's when it is on, else x's."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def block_params(block: nn.Module):
    """The parameters the fused op takes, in its argument order."""
    try:  # the registries themselves: attribute lookups through Module.__getattr__ cost more
        mods = block._modules
        dw, norm = mods["dwconv"]._parameters, mods["norm"]._parameters
        fc1, fc2 = mods["pwconv1"]._parameters, mods["pwconv2"]._parameters
        return (dw["weight"], dw["bias"], norm["weight"], norm["bias"], fc1["weight"],
                fc1["bias"], fc2["weight"], fc2["bias"], block._parameters["gamma"])
    except KeyError:  # e.g. gamma set as a plain tensor attribute
        pass
    return (block.dwconv.weight, block.dwconv.bias, block.norm.weight, block.norm.bias,
            block.pwconv1.weight, block.pwconv1.bias, block.pwconv2.weight, block.pwconv2.bias,
            block.gamma)


def needs_backward(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd will ask this block for gradients (else nothing is kept for it)."""
    return torch.is_grad_enabled() and (x.requires_grad
                                        or any(p.requires_grad for p in block.parameters()))


def _switched_on_for(x: torch.Tensor) -> bool:
    """What every dispatch decision needs: switched on, and a real tensor (not traced by fx,
    TorchScript or the ONNX exporter)."""
    if not _ENABLED or torch.jit.is_scripting() or isinstance(x, torch.fx.Proxy):
        return False
    return not torch.onnx.is_in_onnx_export()


def _tensor_may_take_fast_path(x: torch.Tensor) -> bool:
    """What both Triton dispatch decisions need: switched on, a tensor the kernels take."""
    return _switched_on_for(x) and fast_path_available(x)


def use_fast_path(block: nn.Module, x: torch.Tensor) -> bool:
    """The dispatch decision of `ConvNextBlock.forward`."""
    if not (_tensor_may_take_fast_path(x) and block_supported(block)):
        return False
    if x.numel() < MIN_TRAIN_ELEMENTS and needs_backward(block, x):
        return False
    if torch.compiler.is_compiling():
        if _UNDER_COMPILE:
            return True
        from ._kernels import ln_mlp_supported

        return not needs_backward(block, x) and ln_mlp_supported(x.shape[1], compute_dtype(x))
    return _plain_autograd(x)


def use_cpu_path(block: nn.Module, x: torch.Tensor) -> bool:
    """The CPU dispatch decision of `ConvNextBlock.forward`: eager fp32 inference on CPU."""
    if (not _switched_on_for(x) or x.device.type != "cpu" or x.dim() != 4
            or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or needs_backward(block, x) or not _plain_autograd(x)):
        return False
    # FLOP counters and other dispatch modes (torch.utils.flop_counter) know aten's ops,
    # not oneDNN's; fvcore/mmengine's counters trace (caught above).
    if _get_current_dispatch_mode() is not None:
        return False
    return _cpu.block_supported(block, x)


def cpu_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs `block` with oneDNN's fused linear ops (see `convnext_backbone.ops.cpu`)."""
    return _cpu.block_forward(block, x)


def use_fast_layer_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """The dispatch decision of `LayerNorm2d.forward` (eager mode, channels_last input)."""
    if torch.compiler.is_compiling() or not _tensor_may_take_fast_path(x):
        return False
    return (_plain_autograd(x) and norm.weight is not None and norm.bias is not None
            and x.is_contiguous(memory_format=torch.channels_last)
            and len(norm.normalized_shape) == 1 and x.shape[1] == norm.normalized_shape[0]
            and x.shape[1] <= 4096)


def layer_norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs `LayerNorm2d` through the Triton kernels (see `convnext_backbone.ops.layer_norm`)."""
    from .layer_norm import layer_norm_2d as _impl

    return _impl(x, norm.weight, norm.bias, norm.eps)


def use_fast_downsample(layer: nn.Module, norm: nn.Module, conv: nn.Module,
                        x: torch.Tensor) -> bool:
    """The dispatch decision of a downsampling layer (`layer` = Sequential(`norm`, `conv`),
    the plain LayerNorm2d and Conv2d, checked by the caller): the LayerNorm's fast path,
    under an autocast whose LayerNorm output (fp32 on CUDA) the conv would cast to the
    compute dtype; unhooked."""
    from .layer_norm import output_dtype

    return (use_fast_layer_norm(norm, x) and compute_dtype(x) != output_dtype(x, x.dtype)
            and _no_hooks(layer, norm, conv))


def downsample_forward(norm: nn.Module, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(norm(x))` with the LayerNorm kernel writing the compute dtype itself: the
    autocast conv would otherwise cast its fp32 output, one more pass over the stage's
    output forward and one backward (its gradient cast back to fp32). Same values: both
    round the fp32 LayerNorm output once."""
    from .layer_norm import layer_norm_2d as _impl

    return conv(_impl(x, norm.weight, norm.bias, norm.eps, out_dtype=compute_dtype(x)))


def use_fast_stem(stem: nn.Module, conv: nn.Module, norm: nn.Module, x: torch.Tensor) -> bool:
    """The dispatch decision of the model's stem (`stem` = Sequential(`conv`, `norm`), the
    plain layers, checked by the caller): eager mode, half-precision compute, a
    non-overlapping patch conv with bias, unhooked."""
    if torch.compiler.is_compiling() or not _tensor_may_take_fast_path(x):
        return False
    k = tuple(conv.kernel_size)
    if not (k[0] == k[1] and tuple(conv.stride) == k and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.bias is not None
            and conv.padding_mode == "zeros" and norm.weight is not None
            and norm.bias is not None and tuple(norm.normalized_shape) == (conv.out_channels,)
            and x.shape[1] == conv.in_channels and x.shape[2] % k[0] == 0
            and x.shape[3] % k[0] == 0 and _plain_autograd(x) and _no_hooks(stem, conv, norm)):
        return False
    from ._kernels import stem_supported

    # The kernel's output offsets are int32.
    out_numel = x.shape[0] * conv.out_channels * (x.shape[2] // k[0]) * (x.shape[3] // k[0])
    return out_numel < 2**31 and stem_supported(conv.in_channels, k[0], conv.out_channels,
                                                compute_dtype(x))


def stem_forward(conv: nn.Module, norm: nn.Module, x: torch.Tensor,
                 feeds_block: bool) -> torch.Tensor:
    """Runs the stem through one Triton kernel (see `convnext_backbone.ops.stem`). With
    `feeds_block`, the output carries its compute-dtype copy for the first block (see
    `attach_low_precision_copy`; the caller discards it if no block takes it)."""
    from .stem import stem_forward as _impl

    out, copy = _impl(conv, norm, x, compute_dtype(x), feeds_block)
    if copy is not None:
        attach_low_precision_copy(out, copy)
    return out


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs `block` through the fused custom ops (see `convnext_backbone.ops.block`)."""
    from .block import block_forward as _impl

    return _impl(block, x)


# Last: the CPU path reads this module's helpers (torch only, cheap to import).
from . import cpu as _cpu  # noqa: E402
