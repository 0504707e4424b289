"""Channels-last LayerNorm over C of an NCHW tensor (`LayerNorm2d`) through Triton kernels.

The stem, the downsampling layers and the per-stage output norms normalise 96..768
channels per pixel. aten's LayerNorm gives every such short row its own thread block and,
under autocast, first copies a bf16 input to fp32; here each program normalises many
rows straight from the input dtype, in fp32, into the dtype the reference produces
(fp32 under autocast, as F.layer_norm there; else the input's). Backward reuses the
block's LayerNorm-backward kernel. Taken in eager mode only: under torch.compile Inductor
generates an equivalent kernel itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    """(P, C) view of a channels_last NCHW tensor (a copy if it is not channels_last)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype,
             keep: bool):
    """(output as channels_last NCHW, mean, rstd); the statistics only when `keep`."""
    from . import _kernels

    n, c, h, w = x.shape
    out, mean, rstd = _kernels.ln_fwd(_rows(x), weight, bias, eps, out_dtype, store_stats=keep)
    return out.view(n, h, w, c).permute(0, 3, 1, 2), mean, rstd


class _LayerNorm2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                out_dtype: torch.dtype, keep: bool) -> Tensor:
        out, mean, rstd = _forward(x, weight, bias, eps, out_dtype, keep)
        if keep:
            ctx.save_for_backward(x, mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        from . import _kernels

        x, mean, rstd, weight, bias = ctx.saved_tensors
        n, c, h, w = x.shape
        do = _rows(dout)
        if not do.is_contiguous():
            do = do.contiguous()
        dx, _, dw, db, _ = _kernels.ln_bwd(_rows(x), do, mean, rstd, weight, bias, x.dtype,
                                        rebuild_output=False)
        return (dx.view(n, h, w, c).permute(0, 3, 1, 2), dw.to(weight.dtype),
                db.to(bias.dtype), None, None, None)


def output_dtype(x: Tensor, input_dtype: torch.dtype) -> torch.dtype:
    """F.layer_norm's output dtype for an input of `input_dtype` on x's device: fp32 under
    CUDA autocast, else the input's."""
    return torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else input_dtype


def layer_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                  out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """LayerNorm over the channels of a channels_last (N, C, H, W) tensor, output in
    `out_dtype` (default: F.layer_norm's, `output_dtype`)."""
    if out_dtype is None:
        out_dtype = output_dtype(x, x.dtype)
    keep = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or bias.requires_grad)
    if not keep:  # nothing for autograd to record: skip the Function's per-call work
        return _forward(x, weight, bias, float(eps), out_dtype, False)[0]
    return _LayerNorm2dFunction.apply(x, weight, bias, float(eps), out_dtype, True)
