"""CPU inference path of the ConvNeXt block through oneDNN (mkldnn) fused linear ops.

On CPU, fp32, ~75% of a ConvNeXt forward is the two pointwise Linear layers. aten runs them
as MKL `addmm`, then GELU, the layer-scale multiply and the residual add as three more
passes over memory. oneDNN's `_linear_pointwise` (the op Inductor's CPU fusions emit) runs
the same product with the activation as a post-op, and its binary form adds the residual
in the matmul's epilogue; layer scale folds into pwconv2's weight and bias (gamma * (W h +
b) = (gamma W) h + gamma b). Same parameters, fp32 results within rounding of the
reference (relative error ~1e-6).

Taken for inference only (no autograd recorded: the oneDNN ops have no derivative), fp32
CPU tensors, in eager mode, when pwconv1/pwconv2 are plain `nn.Linear` layers and no hooks
are attached to the layers it computes; torch.compile, fx and jit tracing, TorchScript,
ONNX export, forward-mode AD, functorch transforms and FLOP counters see the reference
code. Whether this torch build's oneDNN ops work, and agree with aten, is
probed once on small tensors; if not, the reference path runs. This module imports only
torch.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Loaded from the end of convnext_backbone.ops, once these are defined.
from . import drop_path_active, submodules_plain

__all__ = ["mkldnn_linear_ok", "block_supported", "block_forward"]

_PROBED: Dict[Tuple[str, str], bool] = {}


def _linear_pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor], attr: str,
                      algorithm: str) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def _linear_add(x: Tensor, other: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ weight^T + bias + other, the addition in the matmul's epilogue."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")


def _post_op(act: nn.Module) -> Tuple[str, str]:
    """(attr, algorithm) of the oneDNN post-op equal to `act`, ("none", "") if none is."""
    if isinstance(act, nn.GELU):
        return "gelu", act.approximate  # "none" is the exact erf GELU, "tanh" the approximation
    if isinstance(act, nn.ReLU):
        return "relu", ""
    return "none", ""


def _probe(attr: str, algorithm: str) -> bool:
    """Whether oneDNN's fused linear with this post-op (and the binary add) runs here and
    matches aten on a small fp32 problem."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(37, 24, generator=gen)
        w1, b1 = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
        w2, b2 = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
        with torch.no_grad():
            h = _linear_pointwise(x, w1, b1, attr, algorithm)
            ref_h = F.linear(x, w1, b1)
            if attr == "gelu":
                ref_h = F.gelu(ref_h, approximate=algorithm)
            elif attr == "relu":
                ref_h = F.relu(ref_h)
            out = _linear_add(ref_h, x, w2, b2)
            ref_out = F.linear(ref_h, w2, b2) + x
        return (torch.allclose(h, ref_h, rtol=1e-4, atol=1e-4)
                and torch.allclose(out, ref_out, rtol=1e-4, atol=1e-4))
    except Exception:  # noqa: BLE001 - any failure of the optional ops means "not here"
        return False


def mkldnn_linear_ok(attr: str = "none", algorithm: str = "") -> bool:
    """Whether this build's oneDNN fused linear (with that post-op) is usable; cached."""
    key = (attr, algorithm)
    if key not in _PROBED:
        _PROBED[key] = (torch.backends.mkldnn.is_available()
                        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                        and _probe(attr, algorithm))
    return _PROBED[key]


def block_supported(block: nn.Module, x: Tensor) -> bool:
    """Whether `block` on `x` (a CPU tensor, no autograd needed) can take this path."""
    if drop_path_active(block):
        return False
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if not torch.backends.mkldnn.enabled:  # the user switched oneDNN off
        return False
    if not submodules_plain(block, ("pwconv1", "act", "pwconv2")):  # computed here, not called
        return False
    params = (block.pwconv1.weight, block.pwconv1.bias, block.pwconv2.weight, block.pwconv2.bias)
    if any(p is None or p.dtype != torch.float32 for p in params):
        return False
    return mkldnn_linear_ok()


def block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """A `ConvNextBlock`'s forward (V1 or V2, any activation, with or without layer scale)
    with the pointwise layers in oneDNN; returns a channels_last (N, C, H, W) tensor."""
    y = block.dwconv(x).permute(0, 2, 3, 1)
    y = block.norm(y)
    n, h, w, c = y.shape
    rows = y.reshape(n * h * w, c)
    attr, algorithm = _post_op(block.act)
    if attr != "none" and not mkldnn_linear_ok(attr, algorithm):
        attr, algorithm = "none", ""
    hidden = _linear_pointwise(rows, block.pwconv1.weight, block.pwconv1.bias, attr, algorithm)
    if attr == "none":
        hidden = block.act(hidden)
    if block.grn is not None:
        hidden = block.grn(hidden.view(n, h, w, -1)).reshape(n * h * w, -1)
    weight, bias = block.pwconv2.weight, block.pwconv2.bias
    if block.gamma is not None:
        weight, bias = weight * block.gamma[:, None], bias * block.gamma
    shortcut = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = _linear_add(hidden, shortcut, weight, bias)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)
