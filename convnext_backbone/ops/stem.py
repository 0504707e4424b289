"""The stem (patch conv 4x4/4 + bias + channels LayerNorm) in one Triton kernel.

Under autocast the reference stem runs four passes over memory: the image cast to the
compute dtype, cuDNN's conv (a generic kernel for 3 input channels), the bias add, and the
LayerNorm; the first block then casts the fp32 result back to the compute dtype for its
depthwise conv. `_kernels.stem_patchify_ln` reads the image once, multiplies each 4x4x3
patch with the weights on the tensor cores, adds the bias, normalises, and writes the fp32
output plus its compute-dtype copy, which the first block takes instead of casting
(`ops.attach_low_precision_copy`). The same rounding points as the reference: the image and
the weights rounded to the compute dtype, the conv output (with its bias) rounded before
the LayerNorm, the statistics in fp32.

Backward: the Triton LayerNorm backward from the saved conv output and statistics (its
column sums give the LayerNorm's and the conv bias's gradients), then the weight gradient
as one product of the output gradient with the image's patches (aten's
convolution_backward when the image's gradient is asked for too), rounded to the compute
dtype as the reference's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .layer_norm import _rows, output_dtype


def _stem_fwd(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
              eps: float, cdt: torch.dtype, out_dtype: torch.dtype, emit_lp: bool, keep: bool):
    """(out, out_lp, y, mean, rstd); out and out_lp as channels_last NCHW tensors."""
    from . import _kernels

    n, _, h, w = x.shape
    c, patch = weight.shape[0], weight.shape[-1]
    hp, wp = h // patch, w // patch
    out, lp, y, mean, rstd = _kernels.stem_patchify_ln(
        x, weight.contiguous(), bias, ln_weight, ln_bias, eps, cdt, out_dtype, emit_lp=emit_lp,
        keep_for_backward=keep)
    out = out.view(n, hp, wp, c).permute(0, 3, 1, 2)
    if lp is not None:
        lp = lp.view(n, hp, wp, c).permute(0, 3, 1, 2)
    return out, lp, y, mean, rstd


def _patch_conv_weight_grad(dy: Tensor, x: Tensor, patch: int, cdt: torch.dtype) -> Tensor:
    """The weight gradient of a patch conv (kernel = stride = `patch`, no padding) as one
    product, (C, Cin * patch^2) in `cdt`: dy's (P, C) rows transposed times the image's
    (P, Cin * patch^2) patches, gathered in `cdt` by one copy (the image cast the reference
    makes anyway). cuDNN's weight-gradient kernel for 3 input channels took 0.29 ms of a
    32x512^2 training step on an H100 (bf16), where its operands (the image and dy, about
    150 MB) take about 0.05 ms to read."""
    n, cin, h, w = x.shape
    hp, wp = h // patch, w // patch
    image = x[:, :, :hp * patch, :wp * patch].unflatten(3, (wp, patch)).unflatten(2, (hp, patch))
    patches = torch.empty((n, hp, wp, cin, patch, patch), device=x.device, dtype=cdt)
    patches.copy_(image.permute(0, 2, 4, 1, 3, 5))
    return torch.mm(dy.t(), patches.view(n * hp * wp, cin * patch * patch))


class _StemFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                eps: float, cdt: torch.dtype, out_dtype: torch.dtype, emit_lp: bool):
        out, lp, y, mean, rstd = _stem_fwd(x, weight, bias, ln_weight, ln_bias, eps, cdt,
                                           out_dtype, emit_lp, True)
        # The image itself is kept (the caller holds it anyway) and cast again in backward.
        ctx.save_for_backward(x, weight, y, mean, rstd, ln_weight, ln_bias)
        ctx.cdt = cdt
        ctx.bias_dtype = bias.dtype
        if lp is None:
            lp = out.new_empty((0,), dtype=cdt)
        ctx.mark_non_differentiable(lp)
        # No zero-filled gradient for lp; out, the one differentiable output, always has
        # one when backward runs.
        ctx.set_materialize_grads(False)
        return out, lp

    @staticmethod
    def backward(ctx, dout: Tensor, _dlp: Optional[Tensor]):
        from . import _kernels

        x, weight, y, mean, rstd, ln_weight, ln_bias = ctx.saved_tensors
        n, c, hp, wp = dout.shape
        patch = weight.shape[-1]
        do = _rows(dout)
        if not do.is_contiguous():
            do = do.contiguous()
        dy, _, dlnw, dlnb, db = _kernels.ln_bwd(y, do, mean, rstd, ln_weight, ln_bias, ctx.cdt,
                                                rebuild_output=False, sum_dy=True)
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dy4 = dy.view(n, hp, wp, c).permute(0, 3, 1, 2)
                dx, dw, _ = torch.ops.aten.convolution_backward(
                    dy4, x.to(ctx.cdt), weight.to(ctx.cdt), None, [patch, patch], [0, 0],
                    [1, 1], False, [0, 0], 1, [True, ctx.needs_input_grad[1], False])
            else:
                dx = None
                dw = (_patch_conv_weight_grad(dy, x, patch, ctx.cdt).view(weight.shape)
                      if ctx.needs_input_grad[1] else None)
        return (dx.to(x.dtype) if dx is not None else None,
                dw.to(weight.dtype) if dw is not None else None, db.to(ctx.bias_dtype),
                dlnw.to(ln_weight.dtype), dlnb.to(ln_bias.dtype), None, None, None, None)


def stem_forward(conv: torch.nn.Conv2d, norm: torch.nn.LayerNorm, x: Tensor, cdt: torch.dtype,
                 emit_lp: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(LayerNorm2d(conv(x)), its `cdt` copy or None): the stem's output in the reference's
    dtype, and with `emit_lp` its copy in the compute dtype `cdt` when that differs."""
    out_dtype = output_dtype(x, cdt)  # the LayerNorm's, on the conv output (dtype cdt)
    emit_lp = emit_lp and out_dtype != cdt
    params = (conv.weight, conv.bias, norm.weight, norm.bias)
    keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    args = (x, *params, float(norm.eps), cdt, out_dtype, emit_lp)
    if keep:
        out, lp = _StemFunction.apply(*args)
        return out, (lp if emit_lp else None)
    out, lp, *_ = _stem_fwd(*args, False)
    return out, lp
