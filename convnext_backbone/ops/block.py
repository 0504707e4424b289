"""The fused ConvNeXt block as torch custom ops (`convnext_backbone::block_fwd` /
`block_bwd`), with fake (meta) implementations and autograd registration, so that eager
mode, torch.compile (no graph break: the ops are opaque nodes) and activation
checkpointing all run the same kernels.

Forward, on NHWC pixels (a channels_last NCHW tensor, no permute copy):
    y = dwconv7x7(x) (+ b)          this package's CUDA kernel (default; cuDNN where it does
                                    not apply), cuDNN or Triton; b added by the next kernel
    xn = LayerNorm_C(y)             (mean, rstd per pixel kept, xn discarded)
    h = xn @ W1^T + b1
    z = gelu(h) @ W2^T + b2
    out = x + gamma * z
In bf16/fp16 at widths <= 256 everything after the conv is one Triton kernel
(`_kernels.ln_mlp_residual`): xn, gelu(h) and z never reach memory, and h is written only
when backward needs it. Wider blocks, and fp32 (exact cuBLAS products wanted), run a
Triton LayerNorm, cuBLAS addmm, aten gelu and one addcmul; in half-precision inference on
Hopper, pwconv1 and the GELU are one Triton kernel (`_kernels.linear_gelu`: h never
reaches memory).
Saved for backward: the conv input (x, or its bf16 copy when the CUDA kernel or cuDNN
convolves under autocast), y, h, mean, rstd. Backward: GELU backward in Triton (also giving
pwconv1's bias gradient in the same pass, and either gelu(h) or, in half precision up to
C = 256, pwconv2's weight-gradient product dout^T gelu(h) itself), LayerNorm backward in Triton
(rebuilding xn and, outside the Triton conv, summing the conv bias gradient), the conv's
input gradient as a forward conv with mirrored taps and its weight gradient
(`CONVNEXT_DWCONV=cuda`, default: the CUDA kernels, the first also adding the residual's
gradient, the second summing in fp32; `=cudnn`: cuDNN, the taps mirrored by the launch
that casts the weights), or both with Triton (`=triton`). The backward kernels' column
sums (dout's, dh's, the LayerNorm's) share one buffer and one reduction launch
(`_kernels.ColumnSums`).
Not saved: xn (rebuilt by the LayerNorm-backward kernel), gelu(h) (recomputed), z (gamma's
gradient is sum_k W2[c,k] (dout^T gelu(h))[c,k] + b2[c] sum_p dout[p,c], from the product
that W2's gradient needs anyway). No matmul is recomputed.

Compute dtype: the autocast dtype when autocast is on (as the reference path's Linear
layers), else the input's dtype; the output (the residual stream) has the reference's
dtype, promote(x, gamma, compute dtype).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _module

# Loaded only through convnext_backbone.ops (after it is initialised), so no cycle.
from . import (_LOW_PRECISION_ATTR, attach_low_precision_copy, backward_plan, block_params,
               compute_dtype, cuda_dwconv, forward_plan, in_block_sequence, needs_backward)

__all__ = ["block_fwd", "block_bwd", "block_forward", "conv_impl", "CONV_TRITON", "CONV_CUDNN",
           "CONV_CUDA"]

CONV_TRITON = 0
CONV_CUDNN = 1
CONV_CUDA = 2
_CONV_IMPLS = {"cuda": CONV_CUDA, "cudnn": CONV_CUDNN, "triton": CONV_TRITON}


def conv_impl() -> int:
    """Which kernel runs the depthwise conv: ``CONVNEXT_DWCONV=cuda|cudnn|triton``.

    Default ``cuda``: this package's CUDA kernels (`cuda_dwconv`, built by NVRTC) for
    half-precision channels_last input with channels in groups of 4, cuDNN for the rest.
    On an H100 (bf16, ConvNeXt-T shapes) the conv takes 1.82 ms per 128x224^2 inference
    step against cuDNN's 2.29, and 4.41 ms against 6.70 for a 32x512^2 training step's
    forward convs, input-gradient convs and residual adds (the kernel adds the residual);
    the weight gradient 2.34 against 2.41 ms there and 0.87 against 1.88 ms in a
    2x800x1333 detection step. ``cudnn`` uses cuDNN alone. ``triton``: the Triton
    conv kernels were on par with cuDNN at C=96/192/768 but pathologically slow at C=384
    (6.9 ms against 0.19 ms for 32x384x32x32 on an H100)."""
    name = os.environ.get("CONVNEXT_DWCONV", "cuda").strip().lower()
    if name not in _CONV_IMPLS:
        raise ValueError(f"CONVNEXT_DWCONV must be one of {sorted(_CONV_IMPLS)}, got {name!r}")
    return _CONV_IMPLS[name]


def _library_conv(conv_impl: int) -> bool:
    """Whether the conv runs outside the Triton kernels (CUDA kernel or cuDNN): then the
    conv input is convolved in the compute dtype, y lacks the conv bias, and the LayerNorm
    backward sums the conv bias gradient."""
    return conv_impl != CONV_TRITON


def _nhwc(x: Tensor) -> Tensor:
    """(P, C) view of an NCHW tensor's pixels; a copy only if it is not channels_last."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _empty_nchw_channels_last(like: Tensor, shape: Tuple[int, int, int, int],
                              dtype: torch.dtype) -> Tensor:
    n, c, h, w = shape
    return like.new_empty((n, h, w, c), dtype=dtype).permute(0, 3, 1, 2)


def _depthwise_conv7(x: Tensor, weight: Tensor) -> Tensor:
    """`F.conv2d(x, weight, None, padding=3, groups=C)`. For half-precision channels_last CUDA
    tensors, where aten picks cuDNN, cuDNN's op is called directly: aten's convolution
    dispatch before it costs host time on every call, and eager steps are bound by the host
    issuing kernels. Same kernel, same settings (benchmark, determinism, TF32)."""
    c = x.shape[1]
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.ops.aten.cudnn_convolution.default(
            x, weight, [3, 3], [1, 1], [1, 1], c, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.allow_tf32)
    return F.conv2d(x, weight, None, padding=3, groups=c)


def _library_conv_forward(xc: Tensor, dw_weight: Tensor, dw_weight_c: Tensor,
                          conv_impl: int) -> Tensor:
    """The depthwise conv of the compute-dtype input xc, without bias (`dw_weight_c`: the
    taps cast to xc's dtype, for cuDNN)."""
    if conv_impl == CONV_CUDA and cuda_dwconv.supports(xc):
        try:
            return cuda_dwconv.depthwise_conv7(xc, dw_weight)
        except cuda_dwconv.KernelUnavailable:
            pass  # warned once; cuDNN from now on
    return _depthwise_conv7(xc, dw_weight_c)


def _library_conv_input_grad(dy4: Tensor, dw_weight: Tensor, mirrored_c: Tensor, dout: Tensor,
                             dout_pc: Tensor, dx_dtype: torch.dtype, conv_impl: int) -> Tensor:
    """dx = dout + the conv's input gradient: the conv of dy with the taps mirrored
    (`mirrored_c`: those taps in dy's dtype, for cuDNN; `dout_pc`: dout as (P, C) rows).
    The CUDA kernel adds dout itself, in fp32, instead of a separate pass."""
    n, c, hh, ww = dy4.shape
    if (conv_impl == CONV_CUDA and cuda_dwconv.supports(dy4)
            and dx_dtype in (dy4.dtype, torch.float32)
            and dout_pc.dtype in (dy4.dtype, torch.float32)):
        try:
            return cuda_dwconv.depthwise_conv7(
                dy4, dw_weight, mirror=True,
                residual=dout_pc.view(n, hh, ww, c).permute(0, 3, 1, 2), out_dtype=dx_dtype)
        except cuda_dwconv.KernelUnavailable:
            pass
    dx = _empty_nchw_channels_last(dy4, (n, c, hh, ww), dx_dtype)
    torch.add(dout, _depthwise_conv7(dy4, mirrored_c), out=dx)
    return dx


def _library_conv_weight_grad(dy4: Tensor, xc: Tensor, weight_c: Tensor, conv_impl: int
                              ) -> Tensor:
    """The conv's weight gradient, (C, 1, 7, 7) fp32, from dy and the compute-dtype input xc
    (`weight_c`: any (C, 1, 7, 7) weight in their dtype; cuDNN takes its shape from it)."""
    if conv_impl == CONV_CUDA and cuda_dwconv.supports(dy4) and cuda_dwconv.supports(xc):
        try:
            return cuda_dwconv.depthwise_conv7_weight_grad(xc, dy4)
        except cuda_dwconv.KernelUnavailable:
            pass
    c = xc.shape[1]
    _, ddw, _ = torch.ops.aten.convolution_backward(
        dy4, xc, weight_c, [c], [1, 1], [3, 3], [1, 1], False, [0, 0], c, [False, True, False])
    return ddw.float().contiguous()


def _y_lacks_conv_bias(c: int, cdt: torch.dtype, conv_impl: int) -> bool:
    """Whether the saved conv output y excludes the conv bias (then added on the fly by the
    kernel reading y): always outside the Triton conv, and with the fused MLP kernel."""
    from . import _kernels

    return _library_conv(conv_impl) or _kernels.ln_mlp_supported(c, cdt)


def _out_dtype(x: Tensor, gamma: Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, gamma.dtype), compute_dtype)


def _nothing_saved(x: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Distinct empty (h, mean, rstd): a custom op's outputs may not alias each other."""
    return (x.new_empty((0,), dtype=cdt), x.new_empty((0,), dtype=torch.float32),
            x.new_empty((0,), dtype=torch.float32))


def _block_fwd_impl(x: Tensor, x_lp: Optional[Tensor], dw_weight: Tensor, dw_bias: Tensor,
                    ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                    b2: Tensor, gamma: Tensor, eps: float, compute_dtype: torch.dtype,
                    conv_impl: int, keep_for_backward: bool, emit_lp: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y, h, mean, rstd, xs, out_lp); only `out` is the block's result.
    y, h, mean, rstd, xs are what backward needs (`xs`: the conv input in the compute dtype
    when cuDNN runs the depthwise conv and x has another dtype, else empty). Without
    `keep_for_backward`, h, mean, rstd and xs are empty (an inference pass writes no
    4C-wide tensor at all). `x_lp`, when given, is x already in the compute dtype
    (channels_last); with `emit_lp`, `out_lp` is out in the compute dtype (else empty), for
    the next block. With `keep_for_backward`, the signature's forward plan (`forward_plan`)
    runs the same launches where one applies (eager inference takes it in `block_forward`)."""
    from . import _kernels

    if keep_for_backward:
        planned = _planned_forward(x, x_lp, (dw_weight, dw_bias, ln_weight, ln_bias, w1, b1,
                                             w2, b2, gamma), eps, compute_dtype, conv_impl,
                                   True, emit_lp)
        if planned is not None:  # tensors for every output: empty ones for xs, out_lp
            out, y, h, mean, rstd, xs, out_lp = planned
            empty = x.new_empty((0,), dtype=compute_dtype)
            return (out, y, h, mean, rstd, empty if xs is None else xs,
                    empty.clone() if out_lp is None else out_lp)
    n, c, hh, ww = x.shape
    p = n * hh * ww
    cdt = compute_dtype
    fused_mlp = _kernels.ln_mlp_supported(c, cdt)
    with torch.autocast(x.device.type, enabled=False):
        xf = _nhwc(x)
        if not xf.is_contiguous():
            xf = xf.contiguous()
        xs = x.new_empty((0,), dtype=cdt)
        out = _empty_nchw_channels_last(x, (n, c, hh, ww), _out_dtype(x, gamma, cdt))
        out_pc = out.permute(0, 2, 3, 1).view(p, c)
        if emit_lp:
            out_lp = _empty_nchw_channels_last(x, (n, c, hh, ww), cdt)
            out_lp_pc = out_lp.permute(0, 2, 3, 1).view(p, c)
        else:
            out_lp, out_lp_pc = x.new_empty((0,), dtype=cdt), None
        # One launch casts every weight that is read in the compute dtype. The fused kernel
        # reads its matrices 24% faster in bf16 than casting fp32 ones as it loads them
        # (H100, tools/microbench_ln_mlp.py --weights fp32 bf16); its vectors stay as they are.
        with_taps = (dw_weight,) if _library_conv(conv_impl) else ()
        if fused_mlp:
            w1, w2, *rest = _kernels.cast_params((w1, w2) + with_taps, cdt)
        else:
            w1, b1, w2, b2, *rest = _kernels.cast_params((w1, b1, w2, b2) + with_taps, cdt)
        dwc = rest[0] if rest else dw_weight
        if _library_conv(conv_impl):
            xc = (x_lp if x_lp is not None
                  else x.to(cdt).contiguous(memory_format=torch.channels_last))
            if x.dtype != cdt and keep_for_backward:
                xs = xc
            # The conv bias is added where y is next read (the fused kernel or the LayerNorm):
            # cuDNN would add it in a separate pass over y.
            y4 = _library_conv_forward(xc, dw_weight, dwc, conv_impl)
            y = _nhwc(y4.contiguous(memory_format=torch.channels_last))
        elif fused_mlp:
            taps = dw_weight.reshape(c, 49).t().contiguous()
            y = _kernels.dwconv7(xf, taps, None, n, hh, ww, c, cdt)
        if fused_mlp:
            # LayerNorm, both matmuls, GELU, layer scale and the residual in one kernel.
            saved = _kernels.ln_mlp_residual(y, dw_bias, xf, ln_weight, ln_bias, eps, w1, b1,
                                             w2, b2, gamma, out_pc, store_h=keep_for_backward,
                                             out_lp=out_lp_pc)
            h, mean, rstd = saved if saved is not None else _nothing_saved(x, cdt)
            return out, y, h, mean, rstd, xs, out_lp
        if _library_conv(conv_impl):
            # Triton: aten's LayerNorm gives each short row its own thread block.
            xn, mean, rstd = _kernels.ln_fwd(y, ln_weight, ln_bias, eps, cdt,
                                             store_stats=keep_for_backward, x_bias=dw_bias)
        else:
            taps = dw_weight.reshape(c, 49).t().contiguous()
            y, xn, mean, rstd = _kernels.dwconv7(xf, taps, dw_bias, n, hh, ww, c, cdt,
                                                 ln=(ln_weight, ln_bias, eps))
        if not keep_for_backward and _kernels.linear_gelu_supported(xn, w1):
            g = _kernels.linear_gelu(xn, w1, b1)  # h is never written
        else:
            h = torch.addmm(b1, xn, w1.t())
            g = F.gelu(h)
        del xn
        z = torch.addmm(b2, g, w2.t())
        del g
        if emit_lp:
            _kernels.residual_scale_add(xf, z, gamma, out_pc, out_lp_pc)
        else:
            torch.addcmul(xf, z, gamma, out=out_pc)
    if not keep_for_backward:
        h, mean, rstd = _nothing_saved(x, cdt)
    return out, y, h, mean, rstd, xs, out_lp


def _planned_forward(x: Tensor, x_lp: Optional[Tensor], params: Tuple[Tensor, ...], eps: float,
                     cdt: torch.dtype, conv_impl: int, keep: bool, emit: bool):
    """`_block_fwd_impl`'s outputs from the signature's `forward_plan.ForwardPlan`, None for
    the ones it returns empty, or None where no plan applies."""
    if conv_impl != CONV_CUDA:
        return None
    plan = forward_plan.plan_for(x, x_lp, params, eps, cdt, keep, emit)
    return plan(x, x_lp, params) if plan is not None else None


# The custom ops are what torch.compile sees (opaque nodes with fake implementations);
# eager mode calls the same implementations through `_BlockFunction` (or directly, when
# autograd will not ask for gradients), skipping the custom op dispatcher's per-call Python
# work (which dominated small-batch detection steps).
block_fwd = torch.library.custom_op("convnext_backbone::block_fwd", _block_fwd_impl,
                                    mutates_args=())


@block_fwd.register_fake
def _block_fwd_fake(x, x_lp, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps,
                    compute_dtype, conv_impl, keep_for_backward, emit_lp):
    n, c, hh, ww = x.shape
    p = n * hh * ww
    out = _empty_nchw_channels_last(x, (n, c, hh, ww), _out_dtype(x, gamma, compute_dtype))
    y = x.new_empty((p, c), dtype=compute_dtype)
    out_lp = (_empty_nchw_channels_last(x, (n, c, hh, ww), compute_dtype) if emit_lp
              else x.new_empty((0,), dtype=compute_dtype))
    if not keep_for_backward:
        return (out, y, *_nothing_saved(x, compute_dtype), x.new_empty((0,), dtype=compute_dtype),
                out_lp)
    h = x.new_empty((p, w1.shape[0]), dtype=compute_dtype)
    mean = x.new_empty((p,), dtype=torch.float32)
    rstd = x.new_empty((p,), dtype=torch.float32)
    if _library_conv(conv_impl) and x.dtype != compute_dtype:
        xs = _empty_nchw_channels_last(x, (n, c, hh, ww), compute_dtype)
    else:
        xs = x.new_empty((0,), dtype=compute_dtype)
    return out, y, h, mean, rstd, xs, out_lp


def _block_bwd_impl(dout: Tensor, x: Tensor, y: Tensor, h: Tensor, mean: Tensor, rstd: Tensor,
              dw_weight: Tensor, dw_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor,
              w2: Tensor, b2: Tensor, gamma: Tensor, conv_impl: int, dx_dtype: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                         Tensor]:
    """Gradients (x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma), from
    the signature's backward plan (`backward_plan`: the same launches) where one applies."""
    from . import _kernels

    if conv_impl == CONV_CUDA:
        params = (dw_weight, dw_bias, ln_weight, ln_bias, w1, w2, b2, gamma)
        plan = backward_plan.plan_for(dout, x, y, params, dx_dtype)
        grads = plan(dout, x, y, h, mean, rstd, params) if plan is not None else None
        if grads is not None:
            return grads
    n, c, hh, ww = x.shape
    p = n * hh * ww
    cdt = y.dtype
    with torch.autocast(x.device.type, enabled=False):
        do = _nhwc(dout)
        if not do.is_contiguous():
            do = do.contiguous()
        library_conv = _library_conv(conv_impl)
        # The column sums (dout's: b2's and gamma's gradients; dh's: b1's; the LayerNorm's
        # weight, bias and input gradients') are reduced by one launch at the end.
        sums = _kernels.ColumnSums(p, c, (c, 4 * c, 3 * c if library_conv else 2 * c), x.device)
        do_c, _ = _kernels.cast_colsum(do, cdt, part=sums.band(0))
        # gamma * W2 (the layer scale folded into pwconv2), W1 and, for the library conv, the
        # conv taps mirrored (the input gradient's taps) in the compute dtype: one launch.
        cast = (w2, w1) + ((dw_weight,) if library_conv else ())
        w2g, w1c, *rest = _kernels.cast_params(cast, cdt, row_scale=gamma,
                                               reverse_last=49 if library_conv else 0)
        dg = torch.mm(do_c, w2g)  # (P, 4C)
        # pwconv2 and layer scale: one product m = dout^T gelu(h) serves W2 and gamma. Up to
        # C = 256 the GELU backward forms it (gelu(h) never reaches memory), else cuBLAS from
        # the gelu(h) that the GELU backward writes.
        if _kernels.gelu_bwd_m_supported(c, cdt):
            dh, m, _ = _kernels.gelu_bwd(dg, h, part=sums.band(1), dout=do_c)  # and b1's sums
        else:
            dh, g, _ = _kernels.gelu_bwd(dg, h, part=sums.band(1))
            m = torch.mm(do_c.t(), g)  # (C, 4C)
            del g
        del dg
        dxn = torch.mm(dh, w1c)  # (P, C)
        y_bias = dw_bias if _y_lacks_conv_bias(c, cdt, conv_impl) else None
        # With the library conv, the conv bias gradient (sum of dy) comes from the LayerNorm
        # kernel.
        dy, xn, _, _, _ = _kernels.ln_bwd(y, dxn, mean, rstd, ln_weight, ln_bias, cdt, y_bias,
                                          sum_dy=library_conv, part=sums.band(2))
        del dxn
        dsum, db1, ln_sums = sums.finish()
        dlnw, dlnb, dy_sum = ln_sums[:c], ln_sums[c:2 * c], ln_sums[2 * c:]
        dw2, db2, dgamma = _kernels.layer_scale_grads(m, w2, gamma, b2, dsum)
        del m
        dw1 = torch.mm(dh.t(), xn).float()
        del dh, xn
        if library_conv:
            xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
            dy4 = dy.view(n, hh, ww, c).permute(0, 3, 1, 2)
            wc_mirrored = rest[0]
            # The input gradient of a stride-1 depthwise conv is the forward conv of dy with
            # the taps mirrored: cuDNN's forward kernel does it 2.5x faster than its dgrad
            # (H100, bf16, 32x96x128x128: 0.34 vs 0.87 ms; tools/microbench_kernels.py).
            dx = _library_conv_input_grad(dy4, dw_weight, wc_mirrored, dout, do, dx_dtype,
                                          conv_impl)
            ddw = _library_conv_weight_grad(dy4, xc, wc_mirrored, conv_impl)
            ddw_b = dy_sum
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


@functools.wraps(_block_bwd_impl)  # the op's schema comes from this signature
def _block_bwd_op_impl(*args):
    # A custom op's outputs may not alias each other; in eager mode the gradients may (the
    # small fp32 ones are views of one reduced vector), so the op copies them apart.
    seen, grads = set(), []
    for t in _block_bwd_impl(*args):
        ptr = t.untyped_storage().data_ptr()
        grads.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return tuple(grads)


block_bwd = torch.library.custom_op("convnext_backbone::block_bwd", _block_bwd_op_impl,
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
    (x, _x_lp, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps, compute_dtype,
     conv_impl, _keep, _emit) = inputs
    out, y, h, mean, rstd, xs, out_lp = output
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
    return (dx, None, ddw, ddw_b.to(ctx.dw_bias_dtype), dlnw, dlnb, dw1, db1.to(ctx.b1_dtype),
            dw2, db2, dgamma, None, None, None, None, None)


def _backward(ctx, dout, _dy, _dh, _dmean, _drstd, _dxs, _dout_lp):
    return _input_grads(ctx, dout, torch.ops.convnext_backbone.block_bwd)


torch.library.register_autograd("convnext_backbone::block_fwd", _backward,
                                setup_context=_setup_context)


class _BlockFunction(torch.autograd.Function):
    """Eager-mode twin of the custom op: same implementation, same saved tensors."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _block_fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[-1])  # out_lp: a copy for the next block's conv
        # out_lp gets no gradient: without this, autograd would pass backward a zero-filled
        # tensor of its size (a memory pass per block).
        ctx.set_materialize_grads(False)
        return output[0], output[-1]

    @staticmethod
    def backward(ctx, dout, _dout_lp):
        return _input_grads(ctx, dout, _block_bwd_impl)


# Eager mode: a block whose output feeds the next block's depthwise conv also writes that
# output in the compute dtype (a bf16 copy of the fp32 residual stream under autocast),
# attached to the output tensor; the next block takes it (removing it, so that checkpointing
# or a caller holding the tensor keeps no extra memory) and convolves it instead of casting
# its input again: one pass over memory less per block. The copy is used only while the
# tensor is unchanged (its version counter); hooks that could change the tensor switch this
# off. Inference-mode tensors have no version counter: for them the copy is used only inside
# a stage's own loop over its blocks (`ops.block_sequence`), made by the block before or,
# for the first stage, by the model's fused stem right before the loop; nothing but hooks
# runs in between.
def _take_low_precision_copy(x: Tensor, cdt: torch.dtype) -> Optional[Tensor]:
    entry = x.__dict__.pop(_LOW_PRECISION_ATTR, None)
    if entry is None:
        return None
    copy, version = entry
    if copy.dtype != cdt or copy.shape != x.shape:
        return None
    if version is None:  # made for an inference tensor, inside a stage's loop
        return copy if in_block_sequence() else None
    return copy if not x.is_inference() and version == x._version else None


def _hooks_may_change_output(block: torch.nn.Module) -> bool:
    return bool(block._forward_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


def block_forward(block: torch.nn.Module, x: Tensor) -> Tensor:
    """Runs a `ConvNextBlock` (V1: layer scale, exact GELU, no GRN) through the fused ops.

    Args:
        block: the module whose parameters are used (names unchanged).
        x: (N, C, H, W) input; made channels_last if it is not.
    """
    keep = needs_backward(block, x)
    x = x.contiguous(memory_format=torch.channels_last)
    cdt = compute_dtype(x)
    impl = conv_impl()
    if torch.compiler.is_compiling():
        args = (x, None, *block_params(block), float(block.norm.eps), cdt, impl, keep, False)
        return torch.ops.convnext_backbone.block_fwd(*args)[0]
    x_lp, emit = None, False
    if _library_conv(impl):
        if x.dtype != cdt:
            x_lp = None if block._forward_pre_hooks else _take_low_precision_copy(x, cdt)
        # Decided by the output's dtype, not x's: a stage's first block under autocast takes
        # the downsampling conv's bf16 output and still returns the fp32 residual stream.
        emit = (_out_dtype(x, block.gamma, cdt) != cdt
                and bool(getattr(block, "feeds_block", False))
                and not _hooks_may_change_output(block)
                and (not torch.is_inference_mode_enabled() or in_block_sequence()))
    # x_lp only here: the custom op (compile path) gets None, so none of its outputs (xs may
    # be x_lp) aliases an input.
    params = block_params(block)
    eps = float(block.norm.eps)
    if keep:
        out, out_lp = _BlockFunction.apply(x, x_lp, *params, eps, cdt, impl, keep, emit)
    else:  # nothing for autograd to record: skip the Function's per-call work
        planned = _planned_forward(x, x_lp, params, eps, cdt, impl, False, emit)
        if planned is None:
            planned = _block_fwd_impl(x, x_lp, *params, eps, cdt, impl, keep, emit)
        out, out_lp = planned[0], planned[-1]
    if emit:
        attach_low_precision_copy(out, out_lp)
    return out
