"""Triton kernels of the fused ConvNeXt block (imported only when Triton is present).

Every kernel works on NHWC activations flattened to (pixels, channels), channels
contiguous, so a channels_last NCHW tensor is used in place with no permute copy.
Accumulation is fp32 whatever the storage dtype.

- `dwconv7`: depthwise 7x7 conv (+bias) over NHWC; optionally fused with the channels
  LayerNorm that follows it (forward), or with flipped taps and a residual add (the
  input gradient of the conv, plus the block's shortcut gradient).
- `dwconv7_wgrad`: weight and bias gradients of the depthwise conv, one program per
  (kernel row, chunk of image rows, channel block), partial sums reduced by torch.
- `ln_bwd`: LayerNorm backward from the saved pre-norm activation and per-pixel
  mean / rstd; also rebuilds the LayerNorm output (needed by pwconv1's weight gradient)
  so that it never has to be kept from the forward pass, and can sum its input gradient
  over pixels (the conv bias gradient).
- `cast_colsum`: the block's output gradient cast to the compute dtype and summed over
  pixels (pwconv2's bias and layer scale gradients) in one pass.
- `ln_fwd`: LayerNorm over C of (P, C) rows (optionally plus the conv bias), many rows a program (aten's kernel gives
  each row of only 96..768 channels its own thread block and runs far below bandwidth);
  with `ln_bwd` it is the channels-last LayerNorm of the stem, downsampling layers and
  per-stage output norms.
- `residual_scale_add`: x + gamma * z (the wide blocks' epilogue), also written in the
  compute dtype when the next block's conv reads it.
- `gelu_bwd`: GELU backward that also returns GELU(h) (for pwconv2's weight gradient)
  and the column sums of its result (pwconv1's bias gradient): one pass over the 4C-wide
  tensors instead of three. Up to C = 256 it forms pwconv2's weight-gradient product
  dout^T GELU(h) itself (tensor cores) instead of writing GELU(h).
- `cast_params`: up to five weights cast to the compute dtype by one launch into one
  buffer (optionally the first scaled row-wise: gamma * W2 for the backward).
- `layer_scale_grads`: pwconv2's weight and bias gradients and the layer scale's, from
  dout^T gelu(h) and dout's column sums, in one launch.
- `ColumnSums`: one buffer for the partial column sums of a block's backward kernels
  (`cast_colsum`, `gelu_bwd`, `ln_bwd`), reduced by one launch of `column_sums`.
- `stem_patchify_ln`: the stem (non-overlapping patch conv + bias + channels LayerNorm)
  in one kernel: the image is read once (any strides, any float dtype) and the normalised
  NHWC output written, plus its compute-dtype copy for the first block.
- `ln_mlp_residual`: the rest of the block after the conv in one kernel, for bf16/fp16:
  LayerNorm -> pwconv1 (+bias) -> GELU -> pwconv2 (+bias) -> layer scale -> residual add.
  The 4C-wide hidden activation lives only in registers (stored once, pre-GELU, when the
  backward pass needs it); neither the LayerNorm output nor pwconv2's output reach memory.

Every kernel is launched through `_launch.direct_launch`: after Triton has compiled it for
an argument specialisation, later launches call the compiled kernel directly.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

# Loaded only through convnext_backbone.ops (after it is initialised), so no cycle.
from . import _INTERPRET
from ._launch import direct_launch
from .cuda_dwconv import _capability_of

__all__ = ["dwconv7", "dwconv7_wgrad", "ln_bwd", "cast_colsum", "ln_mlp_residual",
           "ln_mlp_supported", "gelu_bwd", "ln_fwd", "residual_scale_add", "cast_params",
           "layer_scale_grads", "ColumnSums", "stem_patchify_ln", "stem_supported",
           "linear_gelu", "linear_gelu_supported", "linear_gelu_shape_supported",
           "gelu_bwd_m_supported", "column_sums"]


# Host-side integer helpers in plain Python: in recent Triton (3.6, 3.8) `triton.cdiv` and
# `triton.next_power_of_2` are constexpr-function objects whose calls unwrap their arguments
# (about 2 us each against 0.03), and an eager training step makes hundreds of them.
def _pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@direct_launch
@triton.jit
def _dwconv7_kernel(src_ptr, w_ptr, b_ptr, res_ptr, y_ptr, xn_ptr, lnw_ptr, lnb_ptr,
                    mean_ptr, rstd_ptr, H, W, C, eps,
                    FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                    DO_LN: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # Offsets are int32 (the wrapper checks pixels * C < 2**31): the address arithmetic per
    # tap is one add on a precomputed tile of offsets plus a scalar.
    row = tl.program_id(0)  # n * H + h
    wb = tl.program_id(1)
    cb = tl.program_id(2)
    h = row % H
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    wmask = offs_w < W
    optrs = (row * W + offs_w)[:, None] * C + offs_c[None, :]
    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(7):
        dh = (3 - kh) if FLIP else (kh - 3)
        hvalid = (h + dh >= 0) & (h + dh < H)
        for kw in tl.static_range(7):
            dw = (3 - kw) if FLIP else (kw - 3)
            m = hvalid & (offs_w + dw >= 0) & (offs_w + dw < W)
            v = tl.load(src_ptr + (optrs + (dh * W + dw) * C), mask=m[:, None] & cmask[None, :],
                        other=0.0)
            wt = tl.load(w_ptr + (kh * 7 + kw) * C + offs_c, mask=cmask, other=0.0)
            acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    omask = wmask[:, None] & cmask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + optrs, mask=omask, other=0.0).to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + optrs, y, mask=omask)
    if DO_LN:
        # Statistics of the stored (rounded) activation, as the unfused path computes them
        # and as the backward pass will see it.
        out_pix = row * W + offs_w
        yf = tl.where(cmask[None, :], y.to(tl.float32), 0.0)
        mean = tl.sum(yf, axis=1) / C
        d = tl.where(cmask[None, :], yf - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        lw = tl.load(lnw_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        lb = tl.load(lnb_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        xn = d * rstd[:, None] * lw[None, :] + lb[None, :]
        tl.store(xn_ptr + optrs, xn.to(xn_ptr.dtype.element_ty), mask=omask)
        tl.store(mean_ptr + out_pix, mean, mask=wmask)
        tl.store(rstd_ptr + out_pix, rstd, mask=wmask)


@triton.jit
def _tap(x_ptr, offs, ww, d: tl.constexpr, W, C, hvalid, gmask):
    m = hvalid & (ww + d >= 0) & (ww + d < W)
    v = tl.load(x_ptr + (offs + d * C), mask=m[:, None] & gmask, other=0.0)
    return v.to(tl.float32)


@direct_launch
@triton.jit
def _dwconv7_wgrad_kernel(dy_ptr, x_ptr, part_ptr, NH, H, W, C, rows_per_prog,
                          BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    kh = tl.program_id(0)
    chunk = tl.program_id(1)
    cb = tl.program_id(2)
    nchunks = tl.num_programs(1)
    dh = kh - 3
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    offs_w = tl.arange(0, BLOCK_W)
    a0 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a4 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a5 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a6 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    ab = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    r_start = chunk * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, NH)
    for r in range(r_start, r_end):
        h = r % H
        hh = h + dh
        hvalid = (hh >= 0) & (hh < H)
        dst_row = (r + 0 * dh) * W
        for w0 in range(0, W, BLOCK_W):
            ww = w0 + offs_w
            gmask = (ww < W)[:, None] & cmask[None, :]
            goffs = (dst_row + ww)[:, None] * C + offs_c[None, :]
            g = tl.load(dy_ptr + goffs, mask=gmask, other=0.0).to(tl.float32)
            xoffs = goffs + dh * W * C
            a0 += g * _tap(x_ptr, xoffs, ww, -3, W, C, hvalid, gmask)
            a1 += g * _tap(x_ptr, xoffs, ww, -2, W, C, hvalid, gmask)
            a2 += g * _tap(x_ptr, xoffs, ww, -1, W, C, hvalid, gmask)
            a3 += g * _tap(x_ptr, xoffs, ww, 0, W, C, hvalid, gmask)
            a4 += g * _tap(x_ptr, xoffs, ww, 1, W, C, hvalid, gmask)
            a5 += g * _tap(x_ptr, xoffs, ww, 2, W, C, hvalid, gmask)
            a6 += g * _tap(x_ptr, xoffs, ww, 3, W, C, hvalid, gmask)
            ab += g
    # part layout: (chunk, kh, 8, C); slot 7 holds the bias gradient.
    base = part_ptr + ((chunk * 7 + kh) * 8) * C + offs_c
    tl.store(base + 0 * C, tl.sum(a0, axis=0), mask=cmask)
    tl.store(base + 1 * C, tl.sum(a1, axis=0), mask=cmask)
    tl.store(base + 2 * C, tl.sum(a2, axis=0), mask=cmask)
    tl.store(base + 3 * C, tl.sum(a3, axis=0), mask=cmask)
    tl.store(base + 4 * C, tl.sum(a4, axis=0), mask=cmask)
    tl.store(base + 5 * C, tl.sum(a5, axis=0), mask=cmask)
    tl.store(base + 6 * C, tl.sum(a6, axis=0), mask=cmask)
    tl.store(base + 7 * C, tl.sum(ab, axis=0), mask=cmask)


@direct_launch
@triton.jit
def _ln_bwd_kernel(y_ptr, yb_ptr, dxn_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, dy_ptr,
                   xn_ptr, part_ptr, part_stride, part_rows, P, C, tiles_per_prog,
                   HAS_YB: tl.constexpr, STORE_XN: tl.constexpr, SUM_DY: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    lw = tl.load(lnw_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    lb = tl.load(lnb_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_YB:
        yb = tl.load(yb_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dy_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        p = (pid * tiles_per_prog + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < P
        m = pm[:, None] & cmask[None, :]
        ptrs = p[:, None] * C + offs_c[None, :]
        y = tl.load(y_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        if HAS_YB:
            y += yb[None, :]
        g = tl.load(dxn_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + p, mask=pm, other=0.0)
        rstd = tl.load(rstd_ptr + p, mask=pm, other=0.0)
        xhat = tl.where(m, (y - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * lw[None, :]
        c1 = tl.sum(xhat * wg, axis=1) / C
        c2 = tl.sum(wg, axis=1) / C
        dy = (wg - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dy_ptr + ptrs, dy.to(dy_ptr.dtype.element_ty), mask=m)
        if STORE_XN:
            xn = xhat * lw[None, :] + lb[None, :]
            tl.store(xn_ptr + ptrs, xn.to(xn_ptr.dtype.element_ty), mask=m)
        dw_acc += g * xhat
        db_acc += g
        if SUM_DY:  # the conv bias gradient, instead of another pass over dy
            dy_acc += tl.where(m, dy, 0.0)
    # This program's partial sums: [ln weight (C) | ln bias (C) | dy (C)] in its row.
    row = part_ptr + pid * part_stride
    tl.store(row + offs_c, tl.sum(dw_acc, axis=0), mask=cmask)
    tl.store(row + C + offs_c, tl.sum(db_acc, axis=0), mask=cmask)
    if SUM_DY:
        tl.store(row + 2 * C + offs_c, tl.sum(dy_acc, axis=0), mask=cmask)
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(pid + tl.num_programs(0), part_rows, tl.num_programs(0)):
        tl.store(part_ptr + r * part_stride + offs_c, zero, mask=cmask)
        tl.store(part_ptr + r * part_stride + C + offs_c, zero, mask=cmask)
        if SUM_DY:
            tl.store(part_ptr + r * part_stride + 2 * C + offs_c, zero, mask=cmask)


def _row_tile(P: int, C: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for kernels over whole (P, C) rows: ~4096 elements."""
    block_c = _pow2(C)
    block_p = max(1, min(_pow2(P), 4096 // block_c))
    return block_p, block_c, 8 if block_p * block_c >= 4096 else 4


def _row_programs(P: int, block_p: int, max_progs: int) -> Tuple[int, int]:
    """(programs, row tiles per program) for a persistent kernel over P rows in tiles of
    block_p, at most max_progs programs (at least one), every program with work."""
    tiles = _cdiv(P, block_p)
    progs = max(1, min(tiles, max_progs))
    tiles_per_prog = max(1, _cdiv(tiles, progs))  # P == 0: one program, no rows
    return max(1, _cdiv(tiles, tiles_per_prog)), tiles_per_prog


def _rows_programs(P: int, C: int, device: torch.device) -> Tuple[int, int]:
    """(programs, row tiles per program) of the persistent kernels over (P, C) rows."""
    return _row_programs(P, _row_tile(P, C)[0], 4 * _num_sms(device))


def _ln_bwd_tile(P: int, C: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the LayerNorm backward: 8 or 16 rows a tile, from a
    sweep at ConvNeXt-T's training shapes on an H100 (rows x warps x programs). Against
    `_row_tile`'s ~4096-element tiles: 0.220 -> 0.163 ms at 524288x96, 0.136 -> 0.099 at
    131072x192, 0.110 -> 0.052 at 32768x384, 0.067 -> 0.031 at 8192x768 (bf16)."""
    block_c = _pow2(C)
    block_p = max(1, min(_pow2(P), max(8, 2048 // block_c)))
    return block_p, block_c, 2 if block_c == 256 else 4


def _ln_bwd_programs(P: int, C: int, device: torch.device) -> Tuple[int, int]:
    """(programs, row tiles per program) of the LayerNorm backward."""
    return _row_programs(P, _ln_bwd_tile(P, C)[0], 4 * _num_sms(device))


def _band_rows(part: torch.Tensor, progs: int) -> int:
    """Rows of a partial-sum band written by `progs` programs (the rows past theirs are
    zeroed by them: launching more programs, with no work, was measured 2x slower for
    `gelu_bwd`, whose programs then no longer fit on the GPU at once)."""
    if part.dim() != 2 or part.shape[0] < progs or part.dtype != torch.float32:
        raise ValueError(f"partial sums need an fp32 (rows >= {progs}, width) band, got "
                         f"{tuple(part.shape)} {part.dtype}")
    return part.shape[0]


_SM_COUNTS: dict = {}


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter), cached."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNTS.get(index)
    if n is None:
        n = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


def _conv_tile(C: int, W: int, full_c: bool) -> Tuple[int, int, int]:
    """(BLOCK_W, BLOCK_C, num_warps): about 4096 elements a program."""
    block_c = _pow2(C) if full_c else min(_pow2(C), 128)
    block_w = max(1, min(_pow2(W), 4096 // block_c))
    num_warps = 8 if block_w * block_c >= 4096 else 4
    return block_w, block_c, num_warps


def dwconv7(src: torch.Tensor, weight_taps: torch.Tensor, bias: Optional[torch.Tensor],
            N: int, H: int, W: int, C: int, out_dtype: torch.dtype, *, flip: bool = False,
            residual: Optional[torch.Tensor] = None, ln: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
            ln_dtype: Optional[torch.dtype] = None):
    """Depthwise 7x7 conv (padding 3) over NHWC pixels.

    Args:
        src: (N*H*W, C) contiguous.
        weight_taps: (49, C) contiguous, tap kh*7+kw.
        bias: (C,) or None.
        N, H, W, C: the NHWC shape.
        out_dtype: dtype of the conv output.
        flip: use mirrored taps (the conv's input gradient).
        residual: (N*H*W, C) added to the output.
        ln: (weight, bias, eps) of a LayerNorm over C fused after the conv; then returns
            (y, xn, mean, rstd) instead of y.
        ln_dtype: dtype of the LayerNorm output (default out_dtype).
    """
    P = N * H * W
    y = torch.empty((P, C), device=src.device, dtype=out_dtype)
    block_w, block_c, num_warps = _conv_tile(C, W, full_c=ln is not None)
    if ln is not None:
        xn = torch.empty((P, C), device=src.device, dtype=ln_dtype or out_dtype)
        mean = torch.empty((P,), device=src.device, dtype=torch.float32)
        rstd = torch.empty((P,), device=src.device, dtype=torch.float32)
        lnw, lnb, eps = ln
    else:
        xn = mean = rstd = lnw = lnb = y
        eps = 0.0
    grid = (N * H, _cdiv(W, block_w), _cdiv(C, block_c))
    _dwconv7_kernel[grid](src, weight_taps, bias if bias is not None else y,
                          residual if residual is not None else y, y, xn, lnw, lnb, mean, rstd,
                          H, W, C, eps, FLIP=flip, HAS_BIAS=bias is not None,
                          HAS_RES=residual is not None, DO_LN=ln is not None,
                          BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    if ln is not None:
        return y, xn, mean, rstd
    return y


def dwconv7_wgrad(dy: torch.Tensor, x: torch.Tensor, N: int, H: int, W: int,
                  C: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of a depthwise 7x7 conv's weight, as (49, C) taps, and bias (C,), fp32.

    Args:
        dy: (N*H*W, C) output gradient, contiguous.
        x: (N*H*W, C) conv input, contiguous.
    """
    block_c = min(_pow2(C), 64 if C % 64 == 0 else 32)
    block_w = max(1, min(_pow2(W), 1024 // block_c))
    cblocks = _cdiv(C, block_c)
    NH = N * H
    target = max(1, (8 * _num_sms(dy.device)) // (7 * cblocks))
    rows_per_prog = _cdiv(NH, min(NH, target))
    nchunks = _cdiv(NH, rows_per_prog)
    part = torch.empty((nchunks, 7, 8, C), device=dy.device, dtype=torch.float32)
    _dwconv7_wgrad_kernel[(7, nchunks, cblocks)](dy, x, part, NH, H, W, C, rows_per_prog,
                                                 BLOCK_W=block_w, BLOCK_C=block_c,
                                                 num_warps=4)
    s = part.sum(0)  # (7, 8, C)
    return s[:, :7, :].reshape(49, C), s[0, 7, :].clone()


def ln_bwd(y: torch.Tensor, dxn: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
           lnw: torch.Tensor, lnb: torch.Tensor, dy_dtype: torch.dtype,
           y_bias: Optional[torch.Tensor] = None, rebuild_output: bool = True,
           sum_dy: bool = False, part: Optional[torch.Tensor] = None
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                      Optional[torch.Tensor], Optional[torch.Tensor]]:
    """LayerNorm backward over C of (P, C) rows; returns (dy, xn, dweight, dbias, dy_sum):
    xn (the LayerNorm's output, rebuilt) only with `rebuild_output`, dy_sum (dy summed over
    rows, fp32: the gradient of a bias added before the LayerNorm) only with `sum_dy`,
    else None. With `part` (a (rows, 3C) band of a `ColumnSums`), the three sums are left
    there as partial sums and returned as None.

    Args:
        y: (P, C) the LayerNorm's input (plus `y_bias` (C,) when given: the conv bias that
            the fused forward added on the fly). dxn: (P, C) gradient of its output.
        mean, rstd: (P,) fp32 statistics from the forward pass.
        lnw, lnb: (C,) affine parameters. dy_dtype: dtype of the returned input gradient.
    """
    P, C = y.shape
    grid, meta, tiles_per_prog = ln_bwd_launch(P, C, y.device, y_bias is not None,
                                               rebuild_output, sum_dy)
    progs = grid[0]
    dy = torch.empty((P, C), device=y.device, dtype=dy_dtype)
    xn = torch.empty((P, C), device=y.device, dtype=y.dtype) if rebuild_output else dy
    own = part is None
    if own:
        part = torch.empty((progs, 3 * C), device=y.device, dtype=torch.float32)
    _ln_bwd_kernel[grid](
        y, y_bias if y_bias is not None else lnw, dxn, mean, rstd, lnw, lnb, dy, xn, part,
        part.stride(0), _band_rows(part, progs), P, C, tiles_per_prog, **meta)
    xn = xn if rebuild_output else None
    if not own:
        return dy, xn, None, None, None
    s = column_sums(part)
    return dy, xn, s[:C], s[C:2 * C], s[2 * C:] if sum_dy else None


def ln_bwd_launch(P: int, C: int, device: torch.device, has_y_bias: bool, store_xn: bool,
                  sum_dy: bool) -> Tuple[Tuple[int], dict, int]:
    """`_ln_bwd_kernel`'s grid, constexprs (with num_warps) and row tiles per program."""
    block_p, block_c, num_warps = _ln_bwd_tile(P, C)
    progs, tiles_per_prog = _ln_bwd_programs(P, C, device)
    return (progs,), dict(HAS_YB=has_y_bias, STORE_XN=store_xn, SUM_DY=sum_dy,
                          BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps), tiles_per_prog


@direct_launch
@triton.jit
def _cast_colsum_kernel(src_ptr, dst_ptr, part_ptr, part_stride, part_rows, P, C,
                        tiles_per_prog,
                        STORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        p = (pid * tiles_per_prog + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cmask[None, :]
        ptrs = p[:, None] * C + offs_c[None, :]
        v = tl.load(src_ptr + ptrs, mask=m, other=0.0)
        if STORE:
            tl.store(dst_ptr + ptrs, v.to(dst_ptr.dtype.element_ty), mask=m)
        acc += v.to(tl.float32)
    tl.store(part_ptr + pid * part_stride + offs_c, tl.sum(acc, axis=0), mask=cmask)
    # Rows of a shared partial-sum buffer beyond this launch's programs: zero.
    for r in range(pid + tl.num_programs(0), part_rows, tl.num_programs(0)):
        tl.store(part_ptr + r * part_stride + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32),
                 mask=cmask)


def cast_colsum(x: torch.Tensor, dtype: torch.dtype, part: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x in `dtype`, x summed over rows in fp32) of (P, C) contiguous rows, in one pass
    (x itself is returned when it already has that dtype). With `part` (a (rows, C) band of
    a `ColumnSums`), the sum is left there as partial sums and returned as None."""
    P, C = x.shape
    store = x.dtype != dtype
    grid, meta, tiles_per_prog = cast_colsum_launch(P, C, x.device, store)
    progs = grid[0]
    out = torch.empty((P, C), device=x.device, dtype=dtype) if store else x
    own = part is None
    if own:
        part = torch.empty((progs, C), device=x.device, dtype=torch.float32)
    _cast_colsum_kernel[grid](x, out, part, part.stride(0), _band_rows(part, progs), P, C,
                              tiles_per_prog, **meta)
    return out, (column_sums(part) if own else None)


def cast_colsum_launch(P: int, C: int, device: torch.device, store: bool
                       ) -> Tuple[Tuple[int], dict, int]:
    """`_cast_colsum_kernel`'s grid, constexprs (with num_warps) and row tiles per program."""
    block_p, block_c, num_warps = _row_tile(P, C)
    progs, tiles_per_prog = _rows_programs(P, C, device)
    return (progs,), dict(STORE=store, BLOCK_P=block_p, BLOCK_C=block_c,
                          num_warps=num_warps), tiles_per_prog


# The PTX of `_exp2_approx` / `_rcp_approx` cannot run in Triton's CPU interpreter (the
# tests'); there they are tl.exp2 and a division.
_PTX_MUFU = tl.constexpr(not _INTERPRET)


@triton.jit
def _exp2_approx(x):
    """2^x by one MUFU.EX2 (tl.exp2 adds range fix-ups around it); subnormals flush to 0."""
    if _PTX_MUFU:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _rcp_approx(x):
    """1/x by one MUFU.RCP, for x in [1, inf)."""
    if _PTX_MUFU:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _normal_cdf(h):
    """Phi(h) = erfc(-h / sqrt2) / 2, fp32, with erfc in its exponential form,
    erfc(a) = t exp(P(t) - a^2), t = 1 / (1 + a/2), P of degree 9 (Numerical Recipes'
    erfcc: relative error below 1.2e-7 for every a >= 0), worked in base 2.

    The fused LN-MLP kernel is bound by its GELU's arithmetic: libdevice's erff costs about
    34 instructions a value (two polynomial ranges selected per lane), this about 20 with
    one MUFU.EX2 and one MUFU.RCP; the kernel runs 11-16% faster (H100, bf16; with the GELU
    swapped for the identity, 34% faster). Rounded to bf16, h * Phi(h) equals the exactly
    computed GELU at all but 7 of the 32,558 normal bf16 values |h| < 20: h from -13.5 to
    -13.125, where the GELU is below 2e-38 and Phi(h), subnormal, is flushed to zero.
    aten's GELU, h/2 * (1 + erf(h / sqrt2)), loses its negative tail to cancellation and
    is off at 201.
    """
    b = tl.abs(h) * 0.8493218002880191  # |h| sqrt(log2(e) / 2), so b^2 = log2(e) h^2 / 2
    t = _rcp_approx(b * 0.41627730557884884 + 1.0)  # 1 / (1 + |h| / (2 sqrt2))
    # log2(e) P(t), less 1 for erfc's factor 1/2
    p = 0.246517298 * t - 1.18611495
    p = p * t + 2.14747446
    p = p * t - 1.63775315
    p = p * t + 0.402321582
    p = p * t - 0.26875686
    p = p * t + 0.139630057
    p = p * t + 0.539700616
    p = p * t + 1.4427292
    p = p * t - 2.82574822
    tail = t * _exp2_approx(p - b * b)  # Phi(-|h|)
    return tl.where(h >= 0, 1.0 - tail, tail)


@triton.jit
def _gelu(h):
    """The exact (erf) GELU of fp32 h."""
    return h * _normal_cdf(h)


@triton.jit
def _conv_out_chunk(y_ptr, yb_ptr, rows, rmask, ck, C: tl.constexpr):
    """fp32 (rows, ck) tile of the conv output plus its bias."""
    yk = tl.load(y_ptr + rows[:, None] * C + ck[None, :], mask=rmask[:, None], other=0.0)
    return yk.to(tl.float32) + tl.load(yb_ptr + ck).to(tl.float32)[None, :]


@triton.jit
def _ln_chunk(y_ptr, yb_ptr, lnw_ptr, lnb_ptr, rows, rmask, mean, rstd, c0: tl.constexpr,
              KC: tl.constexpr, C: tl.constexpr, cdt: tl.constexpr):
    """(rows, KC) tile of the LayerNorm output, columns c0.., in the compute dtype."""
    ck = c0 + tl.arange(0, KC)
    yk = _conv_out_chunk(y_ptr, yb_ptr, rows, rmask, ck, C)
    lw = tl.load(lnw_ptr + ck).to(tl.float32)
    lb = tl.load(lnb_ptr + ck).to(tl.float32)
    return ((yk - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]).to(cdt)


@triton.jit
def _residual_out(acc, b2_ptr, gam_ptr, x_ptr, out_ptr, out_lp_ptr, rows, rmask,
                  o0: tl.constexpr, OW: tl.constexpr, C: tl.constexpr, cdt: tl.constexpr,
                  STORE_LP: tl.constexpr):
    """Output columns o0..o0+OW (those < C): pwconv2's bias (the sum rounded like the
    reference's output), layer scale, residual add."""
    offs_o = o0 + tl.arange(0, OW)
    omask = offs_o < C
    b2 = tl.load(b2_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
    z = (acc + b2[None, :]).to(cdt).to(tl.float32)
    gam = tl.load(gam_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
    m2 = rmask[:, None] & omask[None, :]
    optrs = rows[:, None] * C + offs_o[None, :]
    xr = tl.load(x_ptr + optrs, mask=m2, other=0.0).to(tl.float32)
    o = (xr + gam[None, :] * z).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + optrs, o, mask=m2)
    if STORE_LP:  # the next block's conv input, saving it a cast pass
        tl.store(out_lp_ptr + optrs, o.to(out_lp_ptr.dtype.element_ty), mask=m2)


@direct_launch
@triton.jit
def _ln_mlp_kernel(y_ptr, yb_ptr, x_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                   gam_ptr, out_ptr, out_lp_ptr, h_ptr, mean_ptr, rstd_ptr, P, eps,
                   C: tl.constexpr, KC: tl.constexpr, OUT_A: tl.constexpr, OUT_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, STORE_H: tl.constexpr,
                   STORE_LP: tl.constexpr):
    # One program per pixel tile. The LayerNorm output is built once per tile, as C/KC
    # chunks in the compute dtype (the A operands of every hidden chunk's pwconv1 product;
    # rebuilding them for each hidden chunk took 0.89 against 0.58 ms at 32x128x128, C=96,
    # with h stored). The output columns are two power-of-two parts (96 = 64 + 32;
    # OUT_B = 0 when C is one) rather than C padded up: 96 padded to 128 made pwconv2 a
    # third larger.
    pid_m = tl.program_id(0)
    HID: tl.constexpr = 4 * C
    NK: tl.constexpr = C // KC
    cdt: tl.constexpr = y_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < P
    offs_k = tl.arange(0, KC)
    # LayerNorm statistics of y + conv bias over C: two passes, the second from cache.
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in tl.static_range(NK):
        s1 += tl.sum(_conv_out_chunk(y_ptr, yb_ptr, rows, rmask, k * KC + offs_k, C), axis=1)
    mean = s1 / C
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in tl.static_range(NK):
        yk = _conv_out_chunk(y_ptr, yb_ptr, rows, rmask, k * KC + offs_k, C)
        d = tl.where(rmask[:, None], yk - mean[:, None], 0.0)
        s2 += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(s2 / C + eps)
    if STORE_H:
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
    a_chunks = ()
    for k in tl.static_range(NK):
        a_chunks = a_chunks + (_ln_chunk(y_ptr, yb_ptr, lnw_ptr, lnb_ptr, rows, rmask, mean,
                                         rstd, k * KC, KC, C, cdt),)
    offs_h = tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, OUT_A)
    acc_a = tl.zeros([BLOCK_M, OUT_A], dtype=tl.float32)
    if OUT_B > 0:
        offs_b = OUT_A + tl.arange(0, OUT_B)
        bmask = offs_b < C
        acc_b = tl.zeros([BLOCK_M, OUT_B], dtype=tl.float32)
    for j in range(0, HID, BLOCK_H):
        hid = j + offs_h
        hacc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(NK):
            # W1 is (4C, C): its (KC, BLOCK_H) slice W1[hid, ck]^T
            w1 = tl.load(w1_ptr + hid[None, :] * C + (k * KC + offs_k)[:, None]).to(cdt)
            hacc = tl.dot(a_chunks[k], w1, hacc)
        hacc += tl.load(b1_ptr + hid).to(tl.float32)[None, :]
        hq = hacc.to(cdt)  # the reference rounds pwconv1's output before the GELU
        if STORE_H:
            tl.store(h_ptr + rows[:, None] * HID + hid[None, :], hq, mask=rmask[:, None])
        g = _gelu(hq.to(tl.float32)).to(cdt)
        # W2 is (C, 4C): its (BLOCK_H, OUT) slices W2[o, hid]^T
        w2a = tl.load(w2_ptr + offs_a[None, :] * HID + hid[:, None]).to(cdt)
        acc_a = tl.dot(g, w2a, acc_a)
        if OUT_B > 0:
            w2b = tl.load(w2_ptr + offs_b[None, :] * HID + hid[:, None], mask=bmask[None, :],
                          other=0.0).to(cdt)
            acc_b = tl.dot(g, w2b, acc_b)
    _residual_out(acc_a, b2_ptr, gam_ptr, x_ptr, out_ptr, out_lp_ptr, rows, rmask, 0, OUT_A,
                  C, cdt, STORE_LP)
    if OUT_B > 0:
        _residual_out(acc_b, b2_ptr, gam_ptr, x_ptr, out_ptr, out_lp_ptr, rows, rmask, OUT_A,
                      OUT_B, C, cdt, STORE_LP)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    return min(n & -n, cap)


# Widest C the fused kernel takes. Measured on an H100 (bf16, tools/microbench_ln_mlp.py):
# at C=96 and 192 it beats LayerNorm + cuBLAS + GELU + addcmul (memory-bound there); at
# C=384 the unfused cuBLAS products were faster (compute-bound, and the fused kernel's
# register-resident tiles are small: with its current version, 0.35 against 0.22 ms per
# 128x14x14 inference block), so wider stages keep the unfused sequence.
LN_MLP_MAX_C = 256


def ln_mlp_supported(C: int, dtype: torch.dtype) -> bool:
    """Whether `ln_mlp_residual` runs width C in this compute dtype (half types only: its
    matrix products take bf16/fp16 operands; fp32 keeps cuBLAS's exact products)."""
    return (dtype in (torch.bfloat16, torch.float16) and C <= LN_MLP_MAX_C
            and _largest_pow2_divisor(C, 128) >= 16)


def _out_parts(C: int) -> Tuple[int, int]:
    """(OUT_A, OUT_B): C's largest power of two, and the rest padded to a power of two."""
    out_a = 1 << (C.bit_length() - 1)
    rest = C - out_a
    return out_a, (_pow2(rest) if rest else 0)


def _ln_mlp_config(C: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps, num_stages): the fastest of
    `tools/microbench_ln_mlp.py --sweep` on an H100 (bf16 weights), for inference and
    training alike. C <= 192: 64-pixel tiles (at 128x56x56 pixels, C=96: 0.347 ms against
    0.351 for the next best tile; 0.403 ms with h stored). C=256: 128-pixel tiles over two
    warpgroups (0.434 against 0.528 ms with 64, at 128x28x28)."""
    return (64, 32, 4, 3) if C <= 192 else (128, 32, 8, 3)


def ln_mlp_residual(y: torch.Tensor, y_bias: torch.Tensor, x: torch.Tensor,
                    ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    gamma: torch.Tensor, out: torch.Tensor, *, store_h: bool,
                    out_lp: Optional[torch.Tensor] = None, config=None):
    """out = x + gamma * (gelu(LayerNorm(y + y_bias) @ w1^T + b1) @ w2^T + b2), rows of (P, C).

    Args:
        y: (P, C) contiguous, the conv output without its bias; its dtype is the compute
            dtype. y_bias: (C,) the conv's bias, added here (in fp32) instead of by a
            separate pass over y.
        x: (P, C) contiguous, the residual (any float dtype).
        ln_weight, ln_bias, b1, b2, gamma: vectors, any float dtype (read as fp32).
        w1: (4C, C), w2: (C, 4C) contiguous, any float dtype (cast on load).
        out: (P, C) contiguous, written.
        out_lp: (P, C) contiguous, written with `out` rounded to its dtype, when given.
        store_h: also return pwconv1's output (P, 4C) and the LayerNorm's mean, rstd (P,).
        config: (BLOCK_M, BLOCK_H, num_warps, num_stages), for sweeps; default measured.
    Returns:
        (h, mean, rstd) when store_h, else None.
    """
    P, C = y.shape
    if store_h:
        h = torch.empty((P, 4 * C), device=y.device, dtype=y.dtype)
        mean = torch.empty((P,), device=y.device, dtype=torch.float32)
        rstd = torch.empty((P,), device=y.device, dtype=torch.float32)
    else:
        h = mean = rstd = y
    grid, meta = ln_mlp_launch(P, C, store_h, out_lp is not None, config)
    _ln_mlp_kernel[grid](y, y_bias, x, ln_weight, ln_bias, w1, b1, w2, b2, gamma, out,
                         out_lp if out_lp is not None else out, h, mean, rstd, P, eps, **meta)
    return (h, mean, rstd) if store_h else None


def ln_mlp_launch(P: int, C: int, store_h: bool, store_lp: bool, config=None
                  ) -> Tuple[Tuple[int], dict]:
    """`_ln_mlp_kernel`'s grid and constexprs (with num_warps, num_stages) for P rows."""
    block_m, block_h, num_warps, num_stages = config or _ln_mlp_config(C)
    block_h = _largest_pow2_divisor(4 * C, block_h)  # the hidden loop has no tail
    out_a, out_b = _out_parts(C)
    return (_cdiv(P, block_m),), dict(
        C=C, KC=_largest_pow2_divisor(C, 128), OUT_A=out_a, OUT_B=out_b, BLOCK_M=block_m,
        BLOCK_H=block_h, STORE_H=store_h, STORE_LP=store_lp, num_warps=num_warps,
        num_stages=num_stages)


@direct_launch
@triton.jit
def _linear_gelu_kernel(a_ptr, w_ptr, b_ptr, g_ptr, M, N: tl.constexpr, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # Tiles in groups of GROUP_M row tiles, column tiles varying slowest within a group, so
    # that the A rows a group reads stay in L2 while every column tile takes them.
    pid = tl.program_id(0)
    col_tiles: tl.constexpr = N // BLOCK_N
    group = pid // (GROUP_M * col_tiles)
    first_m = group * GROUP_M
    group_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * col_tiles)) % group_m
    pid_n = (pid % (GROUP_M * col_tiles)) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = (rows < M)[:, None]
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    w_ptrs = w_ptr + cols[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rmask, other=0.0)
        acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    hq = acc.to(g_ptr.dtype.element_ty)  # the reference rounds pwconv1's output before the GELU
    tl.store(g_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
             _gelu(hq.to(tl.float32)).to(g_ptr.dtype.element_ty), mask=rmask)


# linear_gelu's tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M): the fastest
# of eight on an H100 at ConvNeXt-T's inference stages 3 and 4 (bf16, 128x224^2), where it
# takes 1.12 ms against cuBLAS + aten GELU's 1.30 (.perf sweep, README "Speed and memory");
# with h also stored (training) every tile was slower than cuBLAS + GELU, so training keeps
# them.
_LINEAR_GELU_TILE = (128, 256, 64, 8, 3, 8)


def linear_gelu_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear_gelu` takes (P, K) x and (N, K) w: half precision, on a Hopper GPU
    (the one its tile was measured on; elsewhere cuBLAS + GELU stay), K a multiple of 64
    and N of 256 (no tails: every ConvNeXt width from 384 on)."""
    return (x.is_cuda and w.dtype == x.dtype and x.is_contiguous() and w.is_contiguous()
            and linear_gelu_shape_supported(x.device, x.dtype, x.shape[1], w.shape[0]))


def linear_gelu_shape_supported(device: torch.device, dtype: torch.dtype, K: int, N: int
                                ) -> bool:
    """`linear_gelu_supported` for contiguous CUDA operands of this dtype and sizes."""
    _, block_n, block_k = _LINEAR_GELU_TILE[:3]
    return (dtype in (torch.bfloat16, torch.float16) and _capability_of(device)[0] == 9
            and K % block_k == 0 and N % block_n == 0)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                tile: Optional[Tuple[int, int, int, int, int, int]] = None) -> torch.Tensor:
    """gelu(x @ w^T + b) for (P, K) contiguous x and (N, K) contiguous w of one half
    dtype, b (N,) of any float dtype: the product rounded to x's dtype (as cuBLAS returns
    it) before the exact GELU (`_gelu`), the result in x's dtype. The product is never
    written: the inference blocks' pwconv1 without a pass of GELU over it.
    `tile`: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M), for sweeps and
    tests; K must be a multiple of BLOCK_K and N of BLOCK_N."""
    block_m, block_n, block_k, num_warps, num_stages, group_m = tile or _LINEAR_GELU_TILE
    P, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or K % block_k or N % block_n:
        raise ValueError(f"linear_gelu needs w (N, {K}) with K a multiple of {block_k} and N "
                         f"of {block_n}, got x {tuple(x.shape)}, w {tuple(w.shape)}")
    g = torch.empty((P, N), device=x.device, dtype=x.dtype)
    grid, meta = linear_gelu_launch(P, N, K, tile)
    _linear_gelu_kernel[grid](x, w, b, g, P, **meta)
    return g


def linear_gelu_launch(P: int, N: int, K: int, tile=None) -> Tuple[Tuple[int], dict]:
    """`_linear_gelu_kernel`'s grid and constexprs (with num_warps, num_stages)."""
    block_m, block_n, block_k, num_warps, num_stages, group_m = tile or _LINEAR_GELU_TILE
    return (_cdiv(P, block_m) * (N // block_n),), dict(
        N=N, K=K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages)


@direct_launch
@triton.jit
def _residual_kernel(x_ptr, z_ptr, gam_ptr, out_ptr, out_lp_ptr, P, C,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m = (rows < P)[:, None] & cmask[None, :]
    ptrs = rows[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
    gam = tl.load(gam_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    o = (x + gam[None, :] * z).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ptrs, o, mask=m)
    tl.store(out_lp_ptr + ptrs, o.to(out_lp_ptr.dtype.element_ty), mask=m)


def residual_scale_add(x: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor,
                       out: torch.Tensor, out_lp: torch.Tensor) -> None:
    """out = x + gamma * z over (P, C) contiguous rows, also written rounded to out_lp's
    dtype (the next block's conv input)."""
    P, C = x.shape
    grid, meta = residual_launch(P, C)
    _residual_kernel[grid](x, z, gamma, out, out_lp, P, C, **meta)


def residual_launch(P: int, C: int) -> Tuple[Tuple[int], dict]:
    """`_residual_kernel`'s grid and constexprs (with num_warps) for (P, C) rows."""
    block_p, block_c, num_warps = _row_tile(P, C)
    return (_cdiv(P, block_p),), dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)


@direct_launch
@triton.jit
def _gelu_bwd_kernel(dg_ptr, h_ptr, dh_ptr, g_ptr, part_ptr, part_stride, part_rows, do_ptr, m_ptr,
                     P, HID, C, tiles_per_prog,
                     BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                     WITH_M: tl.constexpr):
    # WITH_M: instead of storing gelu(h), each program sums dout^T gelu(h) over its rows
    # into its own (C, BLOCK_H) slice of m_ptr's (programs, C, HID) partial products.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < HID
    acc = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    if WITH_M:
        offs_c = tl.arange(0, BLOCK_C)
        chmask = offs_c < C
        macc = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        rows = (pid * tiles_per_prog + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        rmask = rows < P
        m = rmask[:, None] & cmask[None, :]
        ptrs = rows[:, None] * HID + cols[None, :]
        h = tl.load(h_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        cdf = _normal_cdf(h)  # the forward kernel's GELU, so gelu(h) = h * cdf matches it
        pdf = _exp2_approx(h * h * -0.7213475204444817) * 0.3989422804014327  # e^(-h^2/2)/sqrt(2pi)
        dh = (dg * (cdf + h * pdf)).to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + ptrs, dh, mask=m)
        g = (h * cdf).to(dh_ptr.dtype.element_ty)  # rounded as the stored gelu(h) would be
        if WITH_M:
            do = tl.load(do_ptr + rows[:, None] * C + offs_c[None, :],
                         mask=rmask[:, None] & chmask[None, :], other=0.0)
            macc = tl.dot(tl.trans(do), g, macc)
        else:
            tl.store(g_ptr + ptrs, g, mask=m)
        acc += tl.where(m, dh.to(tl.float32), 0.0)  # the bias gradient of the stored dh
    tl.store(part_ptr + pid * part_stride + cols, tl.sum(acc, axis=0), mask=cmask)
    for r in range(pid + tl.num_programs(0), part_rows, tl.num_programs(0)):
        tl.store(part_ptr + r * part_stride + cols, tl.zeros([BLOCK_H], dtype=tl.float32),
                 mask=cmask)
    if WITH_M:
        tl.store(m_ptr + pid * C * HID + offs_c[:, None] * HID + cols[None, :], macc,
                 mask=chmask[:, None] & cmask[None, :])


# The tile of `gelu_bwd` with dout given, by the padded channel count BLOCK_C: (BLOCK_P,
# BLOCK_H, num_warps, programs per SM, num_stages). The fastest of a sweep of 14 (C=96) and 8
# (C=192) tiles on an H100 (bf16, with `layer_scale_grads`): 0.578 against 0.777 ms for
# gelu(h) stored + cuBLAS's product at 524288x96, 0.376 against 0.409 at 131072x192. Wider
# blocks (C=384: 0.32 against 0.22 ms at 32768x384) keep gelu(h) and cuBLAS's product.
_GELU_BWD_M_TILES = {128: (16, 128, 8, 2, 3), 256: (32, 64, 8, 2, 3)}


def _gelu_m_block_c(C: int) -> int:
    """The product's padded channel count: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, _pow2(C))


def _gelu_config(hid: int, C: Optional[int]) -> Tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_H, num_warps, programs per SM, num_stages) of `gelu_bwd` for a hidden
    width, with C when it also forms the weight-gradient product."""
    if C is None:
        block_h = min(128, _pow2(hid))
        return max(1, 4096 // block_h), block_h, 8, 8, 3
    return _GELU_BWD_M_TILES[128 if _gelu_m_block_c(C) <= 128 else 256]


def _gelu_programs(P: int, hid: int, device: torch.device, C: Optional[int] = None
                   ) -> Tuple[int, int]:
    block_p, block_h, _, per_sm, _ = _gelu_config(hid, C)
    return _row_programs(P, block_p, max(1, (per_sm * _num_sms(device)) // _cdiv(hid, block_h)))


def gelu_bwd_m_supported(C: int, dtype: torch.dtype) -> bool:
    """Whether `gelu_bwd` can take dout for C channels: half precision (the product's
    operands), C <= 256 (the (C, BLOCK_H) accumulator in registers)."""
    return dtype in (torch.bfloat16, torch.float16) and 0 < C <= 256


def gelu_bwd(dg: torch.Tensor, h: torch.Tensor, part: Optional[torch.Tensor] = None,
             dout: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dh, gelu(h), dh.sum(0) in fp32) for the exact GELU, from (P, 4C) contiguous dg, h;
    dh and gelu(h) in h's dtype. With `part` (a (rows, 4C) band of a `ColumnSums`), the sum
    is left there as partial sums and returned as None.

    With `dout` ((P, C) contiguous, h's dtype; `gelu_bwd_m_supported`), gelu(h) is not
    written: the second result is instead pwconv2's weight-gradient product
    dout^T gelu(h) as (programs, C, 4C) fp32 partial products (summed over their first dim by
    `layer_scale_grads`), with gelu(h) rounded to h's dtype as a stored one would be. That
    saves writing and re-reading a (P, 4C) tensor."""
    P, hid = h.shape
    C = None if dout is None else dout.shape[1]
    if dout is not None and (dout.shape[0] != P or not dout.is_contiguous()
                             or dout.dtype != h.dtype or not gelu_bwd_m_supported(C, h.dtype)):
        raise ValueError(f"gelu_bwd's dout must be ({P}, C) contiguous {h.dtype} with "
                         f"C <= 256, got {tuple(dout.shape)} {dout.dtype}")
    grid, meta, tiles_per_prog = gelu_bwd_launch(P, hid, h.device, C)
    progs = grid[0]
    dh = torch.empty_like(h)
    own = part is None
    if own:
        part = torch.empty((progs, hid), device=h.device, dtype=torch.float32)
    if dout is None:
        g = torch.empty_like(h)
        _gelu_bwd_kernel[grid](dg, h, dh, g, part, part.stride(0), _band_rows(part, progs), h,
                               part, P, hid, 1, tiles_per_prog, **meta)
    else:
        g = torch.empty((progs, C, hid), device=h.device, dtype=torch.float32)
        _gelu_bwd_kernel[grid](dg, h, dh, dh, part, part.stride(0), _band_rows(part, progs),
                               dout, g, P, hid, C, tiles_per_prog, **meta)
    return dh, g, (column_sums(part) if own else None)


def gelu_bwd_launch(P: int, hid: int, device: torch.device, C: Optional[int] = None
                    ) -> Tuple[Tuple[int, int], dict, int]:
    """`_gelu_bwd_kernel`'s grid, constexprs (with num_warps, num_stages) and row tiles per
    program; with C, for forming the weight-gradient product too."""
    block_p, block_h, num_warps, _, num_stages = _gelu_config(hid, C)
    progs, tiles_per_prog = _gelu_programs(P, hid, device, C)
    return (progs, _cdiv(hid, block_h)), dict(
        BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_C=16 if C is None else _gelu_m_block_c(C),
        WITH_M=C is not None, num_warps=num_warps, num_stages=num_stages), tiles_per_prog


@direct_launch
@triton.jit
def _column_sums_kernel(src_ptr, dst_ptr, R, W, stride, BLOCK_R: tl.constexpr,
                        BLOCK_W: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(src_ptr + rows[:, None] * stride + cols[None, :],
                       mask=(rows < R)[:, None] & cmask[None, :], other=0.0)
    tl.store(dst_ptr + cols, tl.sum(acc, axis=0), mask=cmask)


def column_sums(part: torch.Tensor) -> torch.Tensor:
    """part.sum(0) of an fp32 (R, W) matrix with unit column stride (the kernels' partial
    sums: R about 100..1000 programs), in a fixed order. Each program sums a narrow band of
    columns over all rows with every load in flight at once: 7-11 us for a block's
    backward buffers (about 520 x 768..6144) where aten's sum(0) took 22-25 (H100)."""
    R, W = part.shape
    if part.stride(1) != 1 or part.dtype != torch.float32:
        raise ValueError(f"column_sums needs fp32 rows with unit column stride, got "
                         f"{part.dtype} strides {part.stride()}")
    out = torch.empty((W,), device=part.device, dtype=torch.float32)
    grid, meta = column_sums_launch(R, W)
    _column_sums_kernel[grid](part, out, R, W, part.stride(0), **meta)
    return out


def column_sums_launch(R: int, W: int) -> Tuple[Tuple[int], dict]:
    """`_column_sums_kernel`'s grid and constexprs (with num_warps) for an (R, W) matrix."""
    block_r = min(_pow2(max(R, 1)), 1024)
    block_w = max(1, min(_pow2(W), 8192 // block_r))
    return (_cdiv(W, block_w),), dict(BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4)


class ColumnSums:
    """One fp32 buffer for the per-program partial column sums of several row kernels of
    one backward pass (`cast_colsum`, `gelu_bwd`, `ln_bwd`), each writing its own band of
    columns, so that one reduction launch finishes all of them instead of one each.

    Args:
        P, C: the block's pixels and channels (the kernels run over (P, C) and (P, 4C)).
        widths: the bands' widths, in order, e.g. (C, 4C, 3C). device: where it lives.
    """

    def __init__(self, P: int, C: int, widths: Tuple[int, ...], device: torch.device) -> None:
        self._buf = torch.empty((self.rows(P, C, device), sum(widths)), device=device,
                                dtype=torch.float32)
        self._bounds, start = [], 0
        for w in widths:
            self._bounds.append((start, start + w))
            start += w

    @staticmethod
    def rows(P: int, C: int, device: torch.device) -> int:
        """The buffer's rows: as many as the kernel with the most programs launches (the
        others zero the rows they do not reach)."""
        return max(_rows_programs(P, C, device)[0], _ln_bwd_programs(P, C, device)[0],
                   _gelu_programs(P, 4 * C, device)[0], _gelu_programs(P, 4 * C, device, C)[0])

    def band(self, k: int) -> torch.Tensor:
        """The (rows, widths[k]) band a kernel writes its partial sums into."""
        a, b = self._bounds[k]
        return self._buf[:, a:b]

    def finish(self) -> List[torch.Tensor]:
        """The column sums of every band (views of one reduced vector)."""
        s = column_sums(self._buf)
        return [s[a:b] for a, b in self._bounds]


@triton.jit
def _normalise_rows(x, m, cmask, offs_c, w_ptr, b_ptr, C, eps):
    """LayerNorm of a (rows, BLOCK_C) fp32 tile whose masked-out entries (`m`) are zero:
    (output, mean, rstd), statistics over the C valid columns."""
    mean = tl.sum(x, axis=1) / C
    d = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    w = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    return d * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@direct_launch
@triton.jit
def _ln_fwd_kernel(x_ptr, xb_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, P, C, eps,
                   HAS_X_BIAS: tl.constexpr, STORE_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    rmask = rows < P
    m = rmask[:, None] & cmask[None, :]
    ptrs = rows[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
    if HAS_X_BIAS:  # the conv bias, added on the fly (rows outside the mask stay zero)
        x = tl.where(m, x + tl.load(xb_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :],
                     0.0)
    y, mean, rstd = _normalise_rows(x, m, cmask, offs_c, w_ptr, b_ptr, C, eps)
    tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=m)
    if STORE_STATS:
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)


@direct_launch
@triton.jit
def _stem_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, out_ptr, lp_ptr, y_ptr, mean_ptr,
                 rstd_ptr, P, HWP, WP, sN, sC, sH, sW, eps, C: tl.constexpr,
                 CIN: tl.constexpr, PATCH: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, STORE_LP: tl.constexpr,
                 STORE_Y: tl.constexpr):
    # One row per patch (n, ph, pw), in that order: the output rows are NHWC pixels.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < P
    n = rows // HWP
    ph = (rows % HWP) // WP
    pw = rows % WP
    # Columns in the conv weight's (CIN, PATCH, PATCH) order.
    k = tl.arange(0, BLOCK_K)
    kmask = k < CIN * PATCH * PATCH
    ci = k // (PATCH * PATCH)
    kh = (k // PATCH) % PATCH
    kw = k % PATCH
    src = ((n.to(tl.int64) * sN)[:, None] + (ci * sC)[None, :]
           + ((ph * PATCH)[:, None] + kh[None, :]) * sH
           + ((pw * PATCH)[:, None] + kw[None, :]) * sW)
    cdt = lp_ptr.dtype.element_ty
    a = tl.load(x_ptr + src, mask=rmask[:, None] & kmask[None, :], other=0.0).to(cdt)
    c = tl.arange(0, BLOCK_N)
    cmask = c < C
    w = tl.load(w_ptr + c[None, :] * (CIN * PATCH * PATCH) + k[:, None],
                mask=kmask[:, None] & cmask[None, :], other=0.0).to(cdt)
    acc = tl.dot(a, w)
    # Rounded where autocast's conv rounds: its output, then the bias added in that dtype.
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(cdt).to(tl.float32)
    y = (acc.to(cdt).to(tl.float32) + bias[None, :]).to(cdt)
    m = rmask[:, None] & cmask[None, :]
    ptrs = rows[:, None] * C + c[None, :]
    o, mean, rstd = _normalise_rows(tl.where(m, y.to(tl.float32), 0.0), m, cmask, c, lnw_ptr,
                                    lnb_ptr, C, eps)
    tl.store(out_ptr + ptrs, o.to(out_ptr.dtype.element_ty), mask=m)
    if STORE_LP:
        tl.store(lp_ptr + ptrs, o.to(cdt), mask=m)
    if STORE_Y:
        tl.store(y_ptr + ptrs, y, mask=m)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)


# The stem kernel holds a (64 x pow2(C)) fp32 tile and one (pow2(K) x pow2(C)) weight tile.
_STEM_MAX_C = 256
_STEM_MAX_K = 128


def stem_supported(in_channels: int, patch: int, out_channels: int, dtype: torch.dtype) -> bool:
    """Whether `stem_patchify_ln` covers a stem: half-precision compute (a bf16/fp16 matrix
    product; fp32 keeps cuDNN's conv), patch columns and output channels within one tile."""
    return (dtype in (torch.bfloat16, torch.float16) and out_channels <= _STEM_MAX_C
            and in_channels * patch * patch <= _STEM_MAX_K)


def stem_patchify_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                     compute_dtype: torch.dtype, out_dtype: torch.dtype, *, emit_lp: bool,
                     keep_for_backward: bool):
    """LayerNorm_C(conv(x, weight, stride=patch) + bias) for a non-overlapping patch conv.

    Args:
        x: (N, CIN, H, W), H and W multiples of the patch, any strides and float dtype
            (read and rounded to `compute_dtype`, as autocast's conv does).
        weight: (C, CIN, patch, patch) contiguous; bias, ln_weight, ln_bias: (C,).
    Returns:
        (out, out_lp, y, mean, rstd) with out (P, C) in `out_dtype` (P = N * H/p * W/p
        pixels, NHWC order); out_lp its `compute_dtype` copy when `emit_lp`; y, the conv
        output plus bias in `compute_dtype`, and the LayerNorm's fp32 statistics when
        `keep_for_backward`; None where not asked for.
    """
    n, cin, h, w = x.shape
    c, patch = weight.shape[0], weight.shape[-1]
    hp, wp = h // patch, w // patch
    P = n * hp * wp
    dev = x.device
    out = torch.empty((P, c), device=dev, dtype=out_dtype)
    # Always passed: its dtype is the kernel's compute dtype (one row when not written).
    lp = torch.empty((P if emit_lp else 1, c), device=dev, dtype=compute_dtype)
    if keep_for_backward:
        y = torch.empty((P, c), device=dev, dtype=compute_dtype)
        mean = torch.empty((P,), device=dev, dtype=torch.float32)
        rstd = torch.empty((P,), device=dev, dtype=torch.float32)
    else:
        y = mean = rstd = lp
    block_m, block_n = 64, max(16, _pow2(c))
    _stem_kernel[(_cdiv(P, block_m),)](
        x, weight, bias, ln_weight, ln_bias, out, lp, y, mean, rstd, P, hp * wp, wp,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), eps, C=c, CIN=cin, PATCH=patch,
        BLOCK_M=block_m, BLOCK_K=max(16, _pow2(cin * patch * patch)), BLOCK_N=block_n,
        STORE_LP=emit_lp, STORE_Y=keep_for_backward, num_warps=4 if block_n <= 128 else 8)
    if not keep_for_backward:
        y = mean = rstd = None
    return out, (lp if emit_lp else None), y, mean, rstd


def ln_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
           out_dtype: torch.dtype, *, store_stats: bool, x_bias: Optional[torch.Tensor] = None):
    """LayerNorm over C of (P, C) contiguous rows (plus `x_bias` (C,), when given, before
    normalising), statistics in fp32; returns (out, mean, rstd), the statistics None
    unless `store_stats`."""
    P, C = x.shape
    out = torch.empty((P, C), device=x.device, dtype=out_dtype)
    if store_stats:
        mean = torch.empty((P,), device=x.device, dtype=torch.float32)
        rstd = torch.empty((P,), device=x.device, dtype=torch.float32)
    else:
        mean = rstd = out
    grid, meta = ln_fwd_launch(P, C, x_bias is not None, store_stats)
    _ln_fwd_kernel[grid](x, x_bias if x_bias is not None else weight, weight, bias, out, mean,
                         rstd, P, C, eps, **meta)
    return (out, mean, rstd) if store_stats else (out, None, None)


def ln_fwd_launch(P: int, C: int, has_x_bias: bool, store_stats: bool
                  ) -> Tuple[Tuple[int], dict]:
    """`_ln_fwd_kernel`'s grid and constexprs (with num_warps) for (P, C) rows."""
    block_p, block_c, num_warps = _row_tile(P, C)
    return (_cdiv(P, block_p),), dict(HAS_X_BIAS=has_x_bias, STORE_STATS=store_stats,
                                      BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)


@triton.jit
def _cast_slot(src_ptr, dst_ptr, n, offs, scale_ptr, row_len, SCALED: tl.constexpr,
               REVERSED: tl.constexpr, REV_LEN: tl.constexpr):
    m = offs < n
    src = offs
    if REVERSED:  # each row of REV_LEN elements read back to front (mirrored conv taps)
        src = offs - offs % REV_LEN + (REV_LEN - 1 - offs % REV_LEN)
    v = tl.load(src_ptr + src, mask=m, other=0.0)
    if SCALED:  # times a per-row factor, in fp32 (rows of row_len elements)
        scale = tl.load(scale_ptr + offs // row_len, mask=m, other=0.0)
        v = v.to(tl.float32) * scale.to(tl.float32)
    tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=m)


@direct_launch
@triton.jit
def _cast_params_kernel(s0, d0, n0, s1, d1, n1, s2, d2, n2, s3, d3, n3, s4, d4, n4,
                        scale_ptr, row_len, SCALE0: tl.constexpr, REV_SLOT: tl.constexpr,
                        REV_LEN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.program_id(1)
    if slot == 0:
        _cast_slot(s0, d0, n0, offs, scale_ptr, row_len, SCALE0, REV_SLOT == 0, REV_LEN)
    elif slot == 1:
        _cast_slot(s1, d1, n1, offs, scale_ptr, row_len, False, REV_SLOT == 1, REV_LEN)
    elif slot == 2:
        _cast_slot(s2, d2, n2, offs, scale_ptr, row_len, False, REV_SLOT == 2, REV_LEN)
    elif slot == 3:
        _cast_slot(s3, d3, n3, offs, scale_ptr, row_len, False, REV_SLOT == 3, REV_LEN)
    else:
        _cast_slot(s4, d4, n4, offs, scale_ptr, row_len, False, REV_SLOT == 4, REV_LEN)


_CAST_SLOTS = 5


def cast_params(tensors, dtype: torch.dtype, row_scale: Optional[torch.Tensor] = None,
                reverse_last: int = 0):
    """The (contiguous) `tensors`, at most 5, in `dtype`, cast by one kernel launch into one
    buffer instead of one `.to` (a launch and an allocation) each: the block's weights under
    autocast. Tensors already in `dtype` are returned as they are. With `row_scale` (R,), the
    first tensor, (R, K), is multiplied row-wise by it (in fp32) before rounding. With
    `reverse_last` = L, the last tensor's rows of L elements come out reversed (for conv
    taps (C, 1, 7, 7) and L = 49: `flip(2, 3)`), whatever its dtype."""
    if len(tensors) > _CAST_SLOTS:
        raise ValueError(f"cast_params takes at most {_CAST_SLOTS} tensors, got {len(tensors)}")
    last = len(tensors) - 1
    todo = [i for i, t in enumerate(tensors)
            if t.dtype != dtype or (i == 0 and row_scale is not None)
            or (i == last and reverse_last)]
    out = list(tensors)
    if not todo:
        return out
    sizes = [tensors[i].numel() for i in todo]
    starts, total = cast_layout(sizes, dtype)
    flat = torch.empty((total,), device=tensors[todo[0]].device, dtype=dtype)
    slots = []
    for i, start, n in zip(todo, starts, sizes):
        dst = flat[start:start + n]
        out[i] = dst.view(tensors[i].shape)
        slots += [tensors[i].contiguous(), dst, n]
    while len(slots) < 3 * _CAST_SLOTS:  # unused slots: nothing to copy
        slots += [flat, flat, 0]
    scaled = row_scale is not None
    grid, meta = cast_launch(sizes, scaled, len(todo) - 1 if reverse_last else -1, reverse_last)
    _cast_params_kernel[grid](*slots, row_scale if scaled else flat,
                              tensors[0].shape[-1] if scaled else 1, **meta)
    return out


def cast_layout(sizes, dtype: torch.dtype) -> Tuple[List[int], int]:
    """(start of each piece, total elements) of `cast_params`' buffer: each piece starts
    16-byte aligned (vectorised loads and stores in every slot)."""
    align = max(1, 16 // dtype.itemsize)
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += _cdiv(n, align) * align
    return starts, total


def cast_launch(sizes, scaled: bool, reverse_slot: int, reverse_len: int
                ) -> Tuple[Tuple[int, int], dict]:
    """`_cast_params_kernel`'s grid and constexprs for pieces of `sizes` elements."""
    block = 2048
    return (_cdiv(max(sizes), block), _CAST_SLOTS), dict(
        SCALE0=scaled, REV_SLOT=reverse_slot, REV_LEN=max(1, reverse_len), BLOCK=block,
        num_warps=4)


@direct_launch
@triton.jit
def _layer_scale_grads_kernel(m_ptr, w2_ptr, gam_ptr, b2_ptr, dsum_ptr, dw2_ptr, dgam_ptr,
                              db2_ptr, HID, SLICES, slice_stride,
                              BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    c = tl.program_id(0)
    gam = tl.load(gam_ptr + c).to(tl.float32)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(0, HID, BLOCK_H):
        k = j + tl.arange(0, BLOCK_H)
        km = k < HID
        m = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s0 in range(0, SLICES, BLOCK_S):  # m's slices (partial products) summed
            s = s0 + tl.arange(0, BLOCK_S)
            ms = tl.load(m_ptr + s[:, None] * slice_stride + c * HID + k[None, :],
                         mask=(s < SLICES)[:, None] & km[None, :], other=0.0)
            m += tl.sum(ms.to(tl.float32), axis=0)
        w = tl.load(w2_ptr + c * HID + k, mask=km, other=0.0).to(tl.float32)
        tl.store(dw2_ptr + c * HID + k, (m * gam).to(dw2_ptr.dtype.element_ty), mask=km)
        acc += m * w
    ds = tl.load(dsum_ptr + c)
    b2 = tl.load(b2_ptr + c).to(tl.float32)
    tl.store(dgam_ptr + c, (tl.sum(acc, axis=0) + b2 * ds).to(dgam_ptr.dtype.element_ty))
    tl.store(db2_ptr + c, (gam * ds).to(db2_ptr.dtype.element_ty))


def layer_scale_grads(m: torch.Tensor, w2: torch.Tensor, gamma: torch.Tensor, b2: torch.Tensor,
                      dsum: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of pwconv2's weight and bias and of the layer scale, in their parameters'
    dtypes, from m = dout^T gelu(h) (C, 4C), or (S, C, 4C) partial products of it that are
    summed here (`gelu_bwd`'s), and dsum = dout summed over pixels (C,), fp32:
    dW2 = gamma[:, None] * m, db2 = gamma * dsum, dgamma = sum_k W2 * m + b2 * dsum
    (one launch instead of seven elementwise ops and a reduction)."""
    if m.dim() == 2:
        m = m.unsqueeze(0)
    slices, C, hid = m.shape
    if not m.is_contiguous():
        m = m.contiguous()
    dw2 = torch.empty((C, hid), device=m.device, dtype=w2.dtype)
    dgamma = torch.empty((C,), device=m.device, dtype=gamma.dtype)
    db2 = torch.empty((C,), device=m.device, dtype=b2.dtype)
    grid, meta = layer_scale_grads_launch(slices, C, hid)
    _layer_scale_grads_kernel[grid](m, w2, gamma, b2, dsum, dw2, dgamma, db2, hid, slices,
                                    C * hid, **meta)
    return dw2, db2, dgamma


def layer_scale_grads_launch(slices: int, C: int, hid: int) -> Tuple[Tuple[int], dict]:
    """`_layer_scale_grads_kernel`'s grid and constexprs (with num_warps)."""
    block_h = min(1024, _pow2(hid))
    block_s = max(1, min(_pow2(slices), 8192 // block_h))
    return (C,), dict(BLOCK_S=block_s, BLOCK_H=block_h, num_warps=4)
