"""The fused ConvNeXt block as torch custom ops (`convnext_backbone::block_fwd` /
`block_bwd`), with fake (meta) implementations and autograd registration, so that eager
mode, torch.compile (no graph break: the ops are opaque nodes) and activation
checkpointing all run the same kernels.

Forward, on NHWC pixels (a channels_last NCHW tensor, no permute copy):
    y = dwconv7x7(x) + b            cuDNN (default) or Triton
    xn = LayerNorm_C(y)             (mean, rstd per pixel kept, xn discarded)
    h = xn @ W1^T + b1
    z = gelu(h) @ W2^T + b2
    out = x + gamma * z
In bf16/fp16 at widths <= 256 everything after the conv is one Triton kernel
(`_kernels.ln_mlp_residual`): xn, gelu(h) and z never reach memory, and h is written only
when backward needs it. Wider blocks, and fp32 (exact cuBLAS products wanted), run a
Triton LayerNorm, cuBLAS addmm, aten gelu and one addcmul.
Saved for backward: the conv input (x, or its bf16 copy with cuDNN under autocast), y, h,
mean, rstd. Backward: GELU backward in Triton (also giving gelu(h) and pwconv1's bias
gradient in the same pass), LayerNorm backward in Triton (rebuilding xn), the conv's gradients
with cuDNN (`CONVNEXT_DWCONV=cudnn`, default) or Triton (`=triton`). Not saved:
xn (rebuilt by the LayerNorm-backward kernel), gelu(h) (recomputed), z (gamma's gradient
is sum_k W2[c,k] (dout^T gelu(h))[c,k] + b2[c] sum_p dout[p,c], from the product that
W2's gradient needs anyway). No matmul is recomputed.

Compute dtype: the autocast dtype when autocast is on (as the reference path's Linear
layers), else the input's dtype; the output (the residual stream) has the reference's
dtype, promote(x, gamma, compute dtype).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Loaded only through convnext_backbone.ops (after it is initialised), so no cycle.
from . import block_params, compute_dtype, needs_backward

__all__ = ["block_fwd", "block_bwd", "block_forward", "conv_impl", "CONV_TRITON", "CONV_CUDNN"]

CONV_TRITON = 0
CONV_CUDNN = 1


def conv_impl() -> int:
    """Which kernel runs the depthwise conv: ``CONVNEXT_DWCONV=cudnn|triton``.

    Default cuDNN: on an H100 (bf16, ConvNeXt-T shapes) the Triton conv kernels were on par
    with cuDNN at C=96/192/768 but pathologically slow at C=384 (6.9 ms against 0.19 ms for
    32x384x32x32), so the whole block ran 2x slower with them; the Triton LayerNorm
    backward is used with either."""
    name = os.environ.get("CONVNEXT_DWCONV", "cudnn").strip().lower()
    if name not in ("triton", "cudnn"):
        raise ValueError(f"CONVNEXT_DWCONV must be 'triton' or 'cudnn', got {name!r}")
    return CONV_CUDNN if name == "cudnn" else CONV_TRITON


def _nhwc(x: Tensor) -> Tensor:
    """(P, C) view of an NCHW tensor's pixels; a copy only if it is not channels_last."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _empty_nchw_channels_last(like: Tensor, shape: Tuple[int, int, int, int],
                              dtype: torch.dtype) -> Tensor:
    n, c, h, w = shape
    return like.new_empty((n, h, w, c), dtype=dtype).permute(0, 3, 1, 2)


def _out_dtype(x: Tensor, gamma: Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, gamma.dtype), compute_dtype)


def _nothing_saved(x: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Distinct empty (h, mean, rstd): a custom op's outputs may not alias each other."""
    return (x.new_empty((0,), dtype=cdt), x.new_empty((0,), dtype=torch.float32),
            x.new_empty((0,), dtype=torch.float32))


def _block_fwd_impl(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
              w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma: Tensor, eps: float,
              compute_dtype: torch.dtype, conv_impl: int, keep_for_backward: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y, h, mean, rstd, xs); only `out` is the block's result, the rest is
    what backward needs (`xs`: the conv input in the compute dtype when cuDNN runs the
    depthwise conv and x has another dtype, else empty). Without `keep_for_backward`, h,
    mean, rstd and xs are empty (an inference pass writes no 4C-wide tensor at all)."""
    from . import _kernels

    n, c, hh, ww = x.shape
    p = n * hh * ww
    cdt = compute_dtype
    fused_mlp = _kernels.ln_mlp_supported(c, cdt)
    with torch.autocast(x.device.type, enabled=False):
        xf = _nhwc(x)
        if not xf.is_contiguous():
            xf = xf.contiguous()
        xs = x.new_empty((0,), dtype=cdt)
        if conv_impl == CONV_CUDNN:
            xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
            if x.dtype != cdt and keep_for_backward:
                xs = xc
            # With the fused kernel the conv bias is added there (a separate pass otherwise).
            conv_bias = None if fused_mlp else dw_bias.to(cdt)
            y4 = F.conv2d(xc, dw_weight.to(cdt), conv_bias, padding=3, groups=c)
            y = _nhwc(y4.contiguous(memory_format=torch.channels_last))
        elif fused_mlp:
            taps = dw_weight.reshape(c, 49).t().contiguous()
            y = _kernels.dwconv7(xf, taps, None, n, hh, ww, c, cdt)
        out = _empty_nchw_channels_last(x, (n, c, hh, ww), _out_dtype(x, gamma, cdt))
        out_pc = out.permute(0, 2, 3, 1).view(p, c)
        if fused_mlp:
            # LayerNorm, both matmuls, GELU, layer scale and the residual in one kernel.
            saved = _kernels.ln_mlp_residual(y, dw_bias, xf, ln_weight, ln_bias, eps, w1, b1,
                                             w2, b2, gamma, out_pc, store_h=keep_for_backward)
            h, mean, rstd = saved if saved is not None else _nothing_saved(x, cdt)
            return out, y, h, mean, rstd, xs
        if conv_impl == CONV_CUDNN:
            # Triton: aten's LayerNorm gives each short row its own thread block.
            xn, mean, rstd = _kernels.ln_fwd(y, ln_weight, ln_bias, eps, cdt,
                                             store_stats=keep_for_backward)
        else:
            taps = dw_weight.reshape(c, 49).t().contiguous()
            y, xn, mean, rstd = _kernels.dwconv7(xf, taps, dw_bias, n, hh, ww, c, cdt,
                                                 ln=(ln_weight, ln_bias, eps))
        h = torch.addmm(b1.to(cdt), xn, w1.to(cdt).t())
        del xn
        z = torch.addmm(b2.to(cdt), F.gelu(h), w2.to(cdt).t())
        torch.addcmul(xf, z, gamma, out=out_pc)
    if not keep_for_backward:
        h, mean, rstd = _nothing_saved(x, cdt)
    return out, y, h, mean, rstd, xs


# The custom ops are what torch.compile sees (opaque nodes with fake implementations);
# eager mode calls the same implementations through `_BlockFunction`, skipping the custom
# op dispatcher's per-call Python work (which dominated small-batch detection steps).
block_fwd = torch.library.custom_op("convnext_backbone::block_fwd", _block_fwd_impl,
                                    mutates_args=())


@block_fwd.register_fake
def _block_fwd_fake(x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps,
                    compute_dtype, conv_impl, keep_for_backward):
    n, c, hh, ww = x.shape
    p = n * hh * ww
    out = _empty_nchw_channels_last(x, (n, c, hh, ww), _out_dtype(x, gamma, compute_dtype))
    y = x.new_empty((p, c), dtype=compute_dtype)
    if not keep_for_backward:
        return (out, y, *_nothing_saved(x, compute_dtype), x.new_empty((0,), dtype=compute_dtype))
    h = x.new_empty((p, w1.shape[0]), dtype=compute_dtype)
    mean = x.new_empty((p,), dtype=torch.float32)
    rstd = x.new_empty((p,), dtype=torch.float32)
    if conv_impl == CONV_CUDNN and x.dtype != compute_dtype:
        xs = _empty_nchw_channels_last(x, (n, c, hh, ww), compute_dtype)
    else:
        xs = x.new_empty((0,), dtype=compute_dtype)
    return out, y, h, mean, rstd, xs


def _block_bwd_impl(dout: Tensor, x: Tensor, y: Tensor, h: Tensor, mean: Tensor, rstd: Tensor,
              dw_weight: Tensor, dw_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor,
              w2: Tensor, b2: Tensor, gamma: Tensor, conv_impl: int, dx_dtype: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                         Tensor]:
    """Gradients (x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma)."""
    from . import _kernels

    n, c, hh, ww = x.shape
    p = n * hh * ww
    cdt = y.dtype
    with torch.autocast(x.device.type, enabled=False):
        do = _nhwc(dout)
        if not do.is_contiguous():
            do = do.contiguous()
        do_c = do.to(cdt)
        gam = gamma.float()
        dg = torch.mm(do_c, (w2.float() * gam[:, None]).to(cdt))  # (P, 4C)
        dh, g, db1 = _kernels.gelu_bwd(dg, h)  # one pass: GELU', GELU and pwconv1's bias grad
        del dg
        # pwconv2 and layer scale: one product dout^T gelu(h) serves W2 and gamma.
        m = torch.mm(do_c.t(), g).float()  # (C, 4C)
        del g
        dsum = do.sum(0, dtype=torch.float32)
        dw2 = m * gam[:, None]
        db2 = gam * dsum
        dgamma = (m * w2.float()).sum(1) + b2.float() * dsum
        del m
        dxn = torch.mm(dh, w1.to(cdt))  # (P, C)
        # y lacks the conv bias when the fused forward kernel added it on the fly.
        y_bias = dw_bias if _kernels.ln_mlp_supported(c, cdt) else None
        dy, xn, dlnw, dlnb = _kernels.ln_bwd(y, dxn, mean, rstd, ln_weight, ln_bias, cdt, y_bias)
        del dxn
        dw1 = torch.mm(dh.t(), xn).float()
        del dh, xn
        if conv_impl == CONV_CUDNN:
            xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
            dy4 = dy.view(n, hh, ww, c).permute(0, 3, 1, 2)
            dxc, ddw, ddw_b = torch.ops.aten.convolution_backward(
                dy4, xc, dw_weight.to(cdt), [c], [1, 1], [3, 3], [1, 1], False, [0, 0], c,
                [True, True, True])
            dx = _empty_nchw_channels_last(x, (n, c, hh, ww), dx_dtype)
            torch.add(dout, dxc, out=dx)
            ddw = ddw.float().contiguous()
            ddw_b = ddw_b.float()
        else:
            xf = _nhwc(x)
            if not xf.is_contiguous():
                xf = xf.contiguous()
            taps = dw_weight.reshape(c, 49).t().contiguous()
            dxf = _kernels.dwconv7(dy, taps, None, n, hh, ww, c, dx_dtype, flip=True,
                                   residual=do)
            dx = dxf.view(n, hh, ww, c).permute(0, 3, 1, 2)
            dtaps, ddw_b = _kernels.dwconv7_wgrad(dy, xf, n, hh, ww, c)
            ddw = dtaps.t().contiguous().view(c, 1, 7, 7)
    return (dx, ddw.to(dw_weight.dtype), ddw_b.to(dw_weight.dtype), dlnw.to(ln_weight.dtype),
            dlnb.to(ln_bias.dtype), dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype),
            db2.to(b2.dtype), dgamma.to(gamma.dtype))


block_bwd = torch.library.custom_op("convnext_backbone::block_bwd", _block_bwd_impl,
                                    mutates_args=())


@block_bwd.register_fake
def _block_bwd_fake(dout, x, y, h, mean, rstd, dw_weight, dw_bias, ln_weight, ln_bias, w1, w2, b2,
                    gamma, conv_impl, dx_dtype):
    n, c, hh, ww = x.shape
    dx = _empty_nchw_channels_last(x, (n, c, hh, ww), dx_dtype)
    return (dx, torch.empty_like(dw_weight), dw_weight.new_empty((c,)), torch.empty_like(ln_weight),
            torch.empty_like(ln_bias), torch.empty_like(w1), w1.new_empty((w1.shape[0],)),
            torch.empty_like(w2), torch.empty_like(b2), torch.empty_like(gamma))


def _setup_context(ctx, inputs, output) -> None:
    (x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps, compute_dtype,
     conv_impl, _keep) = inputs
    out, y, h, mean, rstd, xs = output
    # With cuDNN and a compute-dtype copy of x, backward needs only that copy (x itself is
    # then not kept alive by this block).
    conv_in = xs if xs.numel() else x
    ctx.save_for_backward(conv_in, y, h, mean, rstd, dw_weight, dw_bias, ln_weight, ln_bias, w1,
                          w2, b2, gamma)
    ctx.conv_impl = conv_impl
    ctx.x_dtype = x.dtype
    ctx.out_dtype = out.dtype
    ctx.dw_bias_dtype = dw_bias.dtype
    ctx.b1_dtype = b1.dtype


def _input_grads(ctx, dout, bwd):
    x, y, h, mean, rstd, dw_weight, dw_bias, ln_weight, ln_bias, w1, w2, b2, gamma = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x, dtype=ctx.out_dtype)
    (dx, ddw, ddw_b, dlnw, dlnb, dw1, db1, dw2, db2,
     dgamma) = bwd(dout, x, y, h, mean, rstd, dw_weight, dw_bias, ln_weight, ln_bias, w1, w2, b2,
                   gamma, ctx.conv_impl, ctx.x_dtype)
    return (dx, ddw, ddw_b.to(ctx.dw_bias_dtype), dlnw, dlnb, dw1, db1.to(ctx.b1_dtype), dw2,
            db2, dgamma, None, None, None, None)


def _backward(ctx, dout, _dy, _dh, _dmean, _drstd, _dxs):
    return _input_grads(ctx, dout, torch.ops.convnext_backbone.block_bwd)


torch.library.register_autograd("convnext_backbone::block_fwd", _backward,
                                setup_context=_setup_context)


class _BlockFunction(torch.autograd.Function):
    """Eager-mode twin of the custom op: same implementation, same saved tensors."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _block_fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, dout):
        return _input_grads(ctx, dout, _block_bwd_impl)


def block_forward(block: torch.nn.Module, x: Tensor) -> Tensor:
    """Runs a `ConvNextBlock` (V1: layer scale, exact GELU, no GRN) through the fused ops.

    Args:
        block: the module whose parameters are used (names unchanged).
        x: (N, C, H, W) input; made channels_last if it is not.
    """
    keep = needs_backward(block, x)
    x = x.contiguous(memory_format=torch.channels_last)
    args = (x, *block_params(block), float(block.norm.eps), compute_dtype(x), conv_impl(), keep)
    if torch.compiler.is_compiling():
        return torch.ops.convnext_backbone.block_fwd(*args)[0]
    return _BlockFunction.apply(*args)
