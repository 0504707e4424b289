"""A fused block's backward with the host's work cut to its launches.

The backward twin of `ops.forward_plan` (read its docstring first). An eager training
step's backward issues about 12 launches a block, and working them out on every call
(the partial-sum buffer's rows, each kernel's tiles and programs, Triton's
specialisation, the weight-cast layout, views and checks) was most of the 16.5 ms that
the host took to issue a 32x512^2 step's backward on an H100 host, about as long as
the GPU takes to run it. A `BackwardPlan` works them out once per signature (input
shape, compute dtype, the incoming gradient's and the input gradient's dtypes, parameter
dtypes, device) and keeps the compiled kernels with their grids, constexprs and integer
arguments; each call allocates what the general code allocates, in the same order (the
same peak memory), and launches with device addresses.

The launches are those of `ops.block._block_bwd_impl` with the CUDA conv kernels: the
same kernels on the same arguments, so the same gradients bit for bit (the conv taps are
not cast and mirrored along with the weights here: only cuDNN reads that copy). Plans
cover the default configuration (the CUDA conv kernels, half-precision compute, fp32
conv taps, the saved conv input in the compute dtype, Triton's direct launches available,
no launch hooks); elsewhere, and for arguments a plan was not made for (misaligned or
non-contiguous memory, another current device, autocast in another dtype), `plan_for` or
the plan answers None and the caller runs the general code.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _kernels, _launch, cuda_dwconv
from .forward_plan import complete_or_none, dense_and_aligned, plannable, remember

__all__ = ["BackwardPlan", "plan_for"]

# Parameter order (`_block_bwd_impl`'s): dwconv weight and bias, LayerNorm weight and
# bias, pwconv1 weight, pwconv2 weight and bias, layer scale.
_DW, _DW_B, _LN_W, _LN_B, _W1, _W2, _B2, _GAMMA = range(8)
_plans: Dict[Tuple, Optional["BackwardPlan"]] = {}


class BackwardPlan:
    """One signature's block backward (see the module docstring): built from a first
    call's arguments, called with (dout, x, y, h, mean, rstd, params)."""

    def __init__(self, dout: Tensor, x: Tensor, params: Tuple[Tensor, ...], cdt: torch.dtype,
                 dx_dtype: torch.dtype) -> None:
        n, c, hh, ww = x.shape
        p, hid = n * hh * ww, 4 * c
        device = x.device
        self.shape, self.strides = (n, c, hh, ww), (hh * ww * c, 1, ww * c, c)  # channels_last
        self.p, self.c, self.hid, self.cdt, self.dx_dtype = p, c, hid, cdt, dx_dtype
        self.device = device
        launches = []
        # The partial column sums of one backward, in bands as `_block_bwd_impl` lays out
        # its `_kernels.ColumnSums`: dout's (C: b2's and gamma's gradients), dh's (4C:
        # b1's), the LayerNorm's (3C: its weight's, its bias's and its input's, the conv
        # bias's gradient); each kernel is given its band's address.
        f32 = torch.float32
        widths = (c, hid, 3 * c)
        self.sum_rows, width = _kernels.ColumnSums.rows(p, c, device), sum(widths)
        self.sum_width = width
        self.band_bytes = (0, widths[0] * f32.itemsize, (widths[0] + widths[1]) * f32.itemsize)
        # dout in cdt with its column sums, one pass.
        self.cast_dout = dout.dtype != cdt
        grid, meta, tiles = _kernels.cast_colsum_launch(p, c, device, self.cast_dout)
        self.colsum_ints = (width, self.sum_rows, p, c, tiles)
        self.colsum = _kernels._cast_colsum_kernel.compiled(
            grid, (dout.dtype, cdt, f32, *self.colsum_ints), meta)
        launches.append(self.colsum)
        # gamma * W2 (the layer scale folded into pwconv2) and W1 in cdt: one launch.
        w1, w2, gamma = params[_W1], params[_W2], params[_GAMMA]
        self.cast_w1 = w1.dtype != cdt
        sizes = [w2.numel()] + ([w1.numel()] if self.cast_w1 else [])
        starts, self.cast_total = _kernels.cast_layout(sizes, cdt)
        self.w1_start = starts[-1]
        grid, meta = _kernels.cast_launch(sizes, True, -1, 0)
        self.unused_cast_slots = _kernels._CAST_SLOTS - len(sizes)
        slots = [w2, cdt, sizes[0]] + ([w1, cdt, sizes[1]] if self.cast_w1 else [])
        slots += [cdt, cdt, 0] * self.unused_cast_slots
        self.cast = _kernels._cast_params_kernel.compiled(grid, (*slots, gamma, hid), meta)
        launches.append(self.cast)
        # The GELU backward, forming dout^T gelu(h) itself up to C = 256 (`_block_bwd_impl`).
        self.with_m = _kernels.gelu_bwd_m_supported(c, cdt)
        grid, meta, tiles = _kernels.gelu_bwd_launch(p, hid, device, c if self.with_m else None)
        self.m_slices = grid[0] if self.with_m else 1
        self.gelu_ints = (p, hid, c if self.with_m else 1, tiles)
        m_dtype = f32 if self.with_m else cdt
        self.gelu = _kernels._gelu_bwd_kernel.compiled(
            grid, (cdt, cdt, cdt, cdt, f32, width, self.sum_rows, cdt, f32, *self.gelu_ints),
            meta)
        launches.append(self.gelu)
        # The LayerNorm backward: rebuilds xn, adds the conv bias to y (the CUDA conv leaves
        # it out), sums dy for the conv bias gradient.
        grid, meta, tiles = _kernels.ln_bwd_launch(p, c, device, True, True, True)
        self.ln_ints = (width, self.sum_rows, p, c, tiles)
        self.ln = _kernels._ln_bwd_kernel.compiled(
            grid, (cdt, params[_DW_B], cdt, f32, f32, params[_LN_W], params[_LN_B], cdt, cdt,
                   f32, *self.ln_ints), meta)
        launches.append(self.ln)
        grid, meta = _kernels.column_sums_launch(self.sum_rows, width)
        self.colsums_ints = (self.sum_rows, width, width)
        self.colsums = _kernels._column_sums_kernel.compiled(grid, (f32, f32, *self.colsums_ints),
                                                             meta)
        launches.append(self.colsums)
        grid, meta = _kernels.layer_scale_grads_launch(self.m_slices, c, hid)
        self.grad_dtypes = tuple(t.dtype for t in params)
        self.lsg_ints = (hid, self.m_slices, c * hid)
        self.layer_scale = _kernels._layer_scale_grads_kernel.compiled(
            grid, (m_dtype, w2, gamma, params[_B2], f32, w2.dtype, gamma.dtype, params[_B2].dtype,
                   *self.lsg_ints), meta)
        launches.append(self.layer_scale)
        # The conv's input gradient (mirrored taps, adding dout) and weight gradient.
        self.conv_dx = cuda_dwconv.conv_launch(device, cdt, dx_dtype, n, c, hh, ww, True,
                                               mirror=True,
                                               residual_kind=1 if dout.dtype == f32 else 2)
        self.wgrad = cuda_dwconv.wgrad_launch(device, cdt, n, c, hh, ww, True)
        self.wgrad_chunks = self.wgrad.grid[0]
        # A launch that could not be compiled for direct calls: no plan.
        self.complete = all(launch is not None for launch in launches)

    def __call__(self, dout: Tensor, x: Tensor, y: Tensor, h: Tensor, mean: Tensor, rstd: Tensor,
                 params: Tuple[Tensor, ...]) -> Optional[Tuple[Tensor, ...]]:
        """The gradients of (x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2,
        gamma) as `_block_bwd_impl` returns them; None where the arguments do not fit."""
        device, cdt, p, c = self.device, self.cdt, self.p, self.c
        if (torch._C._cuda_getDevice() != device.index
                or not dense_and_aligned(params + (y, h, mean, rstd)) or x.data_ptr() % 16
                or not x.is_contiguous(memory_format=torch.channels_last)
                or _launch.launch_hooks_set()):
            return None
        # cuBLAS runs under the caller's autocast: it must cast nothing (as when it is off).
        if (torch.is_autocast_enabled(device.type)
                and torch.get_autocast_dtype(device.type) != cdt):
            return None
        if not dout.is_contiguous(memory_format=torch.channels_last):
            dout = dout.contiguous(memory_format=torch.channels_last)  # as _nhwc(dout)
        if dout.data_ptr() % 16:
            return None
        hid = self.hid
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        ptr = [t.data_ptr() for t in params]
        sums = torch.empty((self.sum_rows, self.sum_width), device=device, dtype=torch.float32)
        sp = sums.data_ptr()
        band_dout, band_dh, band_ln = (sp + offset for offset in self.band_bytes)
        dop = dout.data_ptr()
        do_c = (torch.empty((p, c), device=device, dtype=cdt) if self.cast_dout
                else dout.permute(0, 2, 3, 1).view(p, c))
        docp = do_c.data_ptr()
        self.colsum(stream, dop, docp, band_dout, *self.colsum_ints)
        flat = torch.empty((self.cast_total,), device=device, dtype=cdt)
        base = flat.data_ptr()
        w1c_ptr = base + self.w1_start * cdt.itemsize
        cast = (ptr[_W2], base, c * hid) + ((ptr[_W1], w1c_ptr, c * hid) if self.cast_w1 else ())
        self.cast(stream, *cast, *(base, base, 0) * self.unused_cast_slots, ptr[_GAMMA], hid)
        w2g = flat.as_strided((c, hid), (hid, 1))
        w1c = flat.as_strided((hid, c), (c, 1), self.w1_start) if self.cast_w1 else params[_W1]
        dg = torch.mm(do_c, w2g)  # (P, 4C)
        dh = torch.empty((p, hid), device=device, dtype=cdt)
        dhp = dh.data_ptr()
        if self.with_m:
            m = torch.empty((self.m_slices, c, hid), device=device, dtype=torch.float32)
            self.gelu(stream, dg.data_ptr(), h.data_ptr(), dhp, dhp, band_dh, self.sum_width,
                      self.sum_rows, docp, m.data_ptr(), *self.gelu_ints)
        else:
            g = torch.empty((p, hid), device=device, dtype=cdt)
            hp = h.data_ptr()
            self.gelu(stream, dg.data_ptr(), hp, dhp, g.data_ptr(), band_dh, self.sum_width,
                      self.sum_rows, hp, band_dh, *self.gelu_ints)
            m = torch.mm(do_c.t(), g)  # (C, 4C)
            del g
        del dg
        dxn = torch.mm(dh, w1c)  # (P, C)
        dy = torch.empty((p, c), device=device, dtype=cdt)
        xn = torch.empty((p, c), device=device, dtype=cdt)
        dyp = dy.data_ptr()
        self.ln(stream, y.data_ptr(), ptr[_DW_B], dxn.data_ptr(), mean.data_ptr(),
                rstd.data_ptr(), ptr[_LN_W], ptr[_LN_B], dyp, xn.data_ptr(), band_ln,
                *self.ln_ints)
        del dxn
        s = torch.empty((self.sum_width,), device=device, dtype=torch.float32)
        self.colsums(stream, sp, s.data_ptr(), *self.colsums_ints)
        del sums
        dtypes = self.grad_dtypes
        dw2 = torch.empty((c, hid), device=device, dtype=dtypes[_W2])
        dgamma = torch.empty((c,), device=device, dtype=dtypes[_GAMMA])
        db2 = torch.empty((c,), device=device, dtype=dtypes[_B2])
        self.layer_scale(stream, m.data_ptr(), ptr[_W2], ptr[_GAMMA], ptr[_B2], s.data_ptr(),
                         dw2.data_ptr(), dgamma.data_ptr(), db2.data_ptr(), *self.lsg_ints)
        del m
        dw1 = torch.mm(dh.t(), xn)  # in cdt; the general code's .float() then .to(w1's dtype)
        dw1 = dw1.to(dtypes[_W1]) if dtypes[_W1] != cdt else dw1  # is this (exactly)
        del dh, xn
        dx = torch.empty_strided(self.shape, self.strides, device=device, dtype=self.dx_dtype)
        self.conv_dx.conv(stream, dyp, ptr[_DW], dop, dx.data_ptr())
        partial = torch.empty((self.wgrad_chunks, c, 49), device=device, dtype=torch.float32)
        self.wgrad(stream, x.data_ptr(), dyp, partial.data_ptr())
        ddw = (partial.sum(0) if self.wgrad_chunks > 1 else partial[0]).view(c, 1, 7, 7)
        db1 = s[c:5 * c].to(dtypes[_W1])
        dlnw = s[5 * c:6 * c].to(dtypes[_LN_W])
        dlnb = s[6 * c:7 * c].to(dtypes[_LN_B])
        ddw_b = s[7 * c:].to(dtypes[_DW])  # the conv bias's gradient: the sum of dy
        return dx, ddw, ddw_b, dlnw, dlnb, dw1, db1, dw2, db2, dgamma


def plan_for(dout: Tensor, x: Tensor, y: Tensor, params: Tuple[Tensor, ...],
             dx_dtype: torch.dtype) -> Optional[BackwardPlan]:
    """The plan for this call's signature (made on first use), or None where none applies
    (then the general implementation runs). `dout`: the output's gradient; `x`: the saved
    conv input; `y`: the saved conv output (its dtype is the compute dtype); `params`:
    `_block_bwd_impl`'s order; `dx_dtype`: the input gradient's dtype."""
    key = (x.shape, x.dtype, y.dtype, dout.dtype, dx_dtype, x.device,
           tuple(t.dtype for t in params))
    plan = _plans.get(key, False)
    if plan is False:
        plan = remember(_plans, key, _build(dout, x, y, params, dx_dtype))
    return plan


def _build(dout: Tensor, x: Tensor, y: Tensor, params: Tuple[Tensor, ...],
           dx_dtype: torch.dtype) -> Optional[BackwardPlan]:
    cdt = y.dtype
    if (x.dtype != cdt or dout.dtype not in (torch.float32, cdt) or dout.shape != x.shape
            or dx_dtype not in (torch.float32, cdt) or not plannable(x, params, cdt)):
        return None
    return complete_or_none(lambda: BackwardPlan(dout, x, params, cdt, dx_dtype))
