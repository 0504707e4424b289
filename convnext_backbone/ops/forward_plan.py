"""A fused block's forward with the host's work cut to its launches.

Eager steps are bound by the host issuing kernels. ConvNeXt-T's block forward is 3 to 6
launches, but working them out on every call (tile sizes, Triton's specialisation, the
weight-cast layout, views, checks) cost the host 5.9 and 9.6 ms per 128x224^2 inference
forward on two lent H100 machines, most of it in the 18 blocks, where the forward's
kernels take 5.8 ms. A `ForwardPlan` works a block's launches out once per signature
(input shape and dtype, parameter dtypes, compute dtype, inference or keeping what
backward needs, whether the output feeds the next block, device) and keeps the compiled
kernels with their grids and constexprs; each call then only allocates and launches,
passing device addresses. Blocks of one stage share a plan (the parameters are
arguments).

The launches are those of `ops.block._block_fwd_impl`: the same kernels on the same
arguments, so the same results bit for bit, and in training the same tensors kept for
backward (the conv taps are not cast along with the weights here: the CUDA conv kernel
reads the fp32 taps, the cast copy is only cuDNN's). Plans cover the default
configuration: the CUDA conv kernel, half-precision compute, fp32 conv taps, Triton's
direct launches available and no launch hooks. Elsewhere, and for arguments a plan was
not made for (misaligned or non-contiguous memory, another current device), `plan_for`
or the plan answers None and the caller runs `_block_fwd_impl`'s general code.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels, _launch, cuda_dwconv

__all__ = ["ForwardPlan", "plan_for", "remember", "dense_and_aligned", "plannable",
           "complete_or_none"]

# Parameter order (ops.block_params): dwconv weight and bias, LayerNorm weight and bias,
# pwconv1 weight and bias, pwconv2 weight and bias, layer scale.
_DW, _W1, _B1, _W2, _B2, _GAMMA = 0, 4, 5, 6, 7, 8
_HALF = (torch.bfloat16, torch.float16)
_MAX_PLANS = 64  # signatures kept (a model's stages at a few input sizes)
_plans: Dict[Tuple, Optional["ForwardPlan"]] = {}


def dense_and_aligned(tensors) -> bool:
    """All contiguous and 16-byte aligned (the alignment the kernels were compiled for)."""
    ptrs = 0
    for t in tensors:
        if not t.is_contiguous():
            return False
        ptrs |= t.data_ptr()
    return ptrs % 16 == 0


class ForwardPlan:
    """One signature's block forward (see the module docstring), for inference or keeping
    what backward needs: built from a first call's arguments, called with (x, x_lp,
    params)."""

    def __init__(self, x: Tensor, params: Tuple[Tensor, ...], eps: float, cdt: torch.dtype,
                 keep: bool, emit: bool) -> None:
        n, c, h, w = x.shape
        p = n * h * w
        self.shape, self.strides = (n, c, h, w), (h * w * c, 1, w * c, c)  # channels_last
        self.p, self.c, self.eps, self.cdt, self.keep, self.emit = p, c, eps, cdt, keep, emit
        self.device = x.device
        gamma = params[_GAMMA]
        self.out_dtype = torch.promote_types(torch.promote_types(x.dtype, gamma.dtype), cdt)
        self.fused = _kernels.ln_mlp_supported(c, cdt)
        out, lp = self.out_dtype, cdt
        launches = []
        self.linear_gelu = None  # pwconv1 + GELU as one kernel (wide inference blocks)
        # The weights read in cdt, cast by one launch: w1, w2 for the fused kernel (which
        # reads the vectors as they are); w1, b1, w2, b2 for cuBLAS.
        wanted = (_W1, _W2) if self.fused else (_W1, _B1, _W2, _B2)
        cast_ids = [i for i in wanted if params[i].dtype != cdt]
        self.cast_slots: Tuple[Tuple[int, int, int], ...] = ()
        self.cast_total = 0
        if cast_ids:
            sizes = [params[i].numel() for i in cast_ids]
            starts, self.cast_total = _kernels.cast_layout(sizes, cdt)
            self.cast_slots = tuple((i, start * cdt.itemsize, size)
                                    for i, start, size in zip(cast_ids, starts, sizes))
            grid, meta = _kernels.cast_launch(sizes, False, -1, 0)
            slots = [a for i, _, size in self.cast_slots for a in (params[i], cdt, size)]
            slots += [cdt, cdt, 0] * (_kernels._CAST_SLOTS - len(cast_ids))
            self.cast = _kernels._cast_params_kernel.compiled(grid, (*slots, cdt, 1), meta)
            launches.append(self.cast)
        self.conv = cuda_dwconv.conv_launch(x.device, cdt, cdt, n, c, h, w, True)
        dw_bias, ln_weight, ln_bias = params[1:4]
        if self.fused:
            grid, meta = _kernels.ln_mlp_launch(p, c, keep, emit)
            stats = torch.float32 if keep else cdt  # (h, mean, rstd: y's address when unused)
            self.mlp = _kernels._ln_mlp_kernel.compiled(
                grid, (cdt, dw_bias, x, ln_weight, ln_bias, cdt, params[_B1], cdt,
                       params[_B2], gamma, out, lp if emit else out, cdt, stats, stats, p,
                       eps), meta)
            launches.append(self.mlp)
        else:
            grid, meta = _kernels.ln_fwd_launch(p, c, True, keep)
            stats = torch.float32 if keep else cdt  # (mean, rstd: xn's address when unused)
            self.ln = _kernels._ln_fwd_kernel.compiled(
                grid, (cdt, dw_bias, ln_weight, ln_bias, cdt, stats, stats, p, c, eps), meta)
            launches.append(self.ln)
            # Training keeps h: cuBLAS, then aten's GELU.
            if not keep and _kernels.linear_gelu_shape_supported(x.device, cdt, c, 4 * c):
                grid, meta = _kernels.linear_gelu_launch(p, 4 * c, c)
                self.linear_gelu = _kernels._linear_gelu_kernel.compiled(
                    grid, (cdt, cdt, cdt, cdt, p), meta)
                launches.append(self.linear_gelu)
            if emit:
                grid, meta = _kernels.residual_launch(p, c)
                self.residual = _kernels._residual_kernel.compiled(
                    grid, (x, cdt, gamma, out, lp, p, c), meta)
                launches.append(self.residual)
        # A launch that could not be compiled for direct calls: no plan.
        self.complete = all(launch is not None for launch in launches)

    def _in_compute_dtype(self, flat: Optional[Tensor], params: Tuple[Tensor, ...], index: int,
                          shape: Tuple[int, ...], strides: Tuple[int, ...]) -> Tensor:
        """Parameter `index` in cdt as the view (shape, strides): of the cast buffer, or of
        the parameter itself where it is in cdt already."""
        for i, offset, _ in self.cast_slots:
            if i == index:
                return flat.as_strided(shape, strides, offset // self.cdt.itemsize)
        return params[index].as_strided(shape, strides)

    def __call__(self, x: Tensor, x_lp: Optional[Tensor], params: Tuple[Tensor, ...]
                 ) -> Optional[Tuple[Optional[Tensor], ...]]:
        """(out, y, h, mean, rstd, xs, out_lp) as `_block_fwd_impl` returns them, with None
        for what it returns empty (h, mean, rstd without `keep`; xs unless x is wider
        than cdt and kept; out_lp unless `emit`); None where the arguments do not fit."""
        device, cdt, p, c, keep = self.device, self.cdt, self.p, self.c, self.keep
        if (torch._C._cuda_getDevice() != device.index or not dense_and_aligned(params)
                or x.data_ptr() % 16 or not x.is_contiguous(memory_format=torch.channels_last)
                or _launch.launch_hooks_set()):
            return None
        # cuBLAS runs under the caller's autocast: it must cast nothing (as when it is off).
        if (not self.fused and torch.is_autocast_enabled(device.type)
                and torch.get_autocast_dtype(device.type) != cdt):
            return None
        if x_lp is not None:
            xc = x_lp
            if not xc.is_contiguous(memory_format=torch.channels_last):
                return None
        else:
            xc = x if x.dtype == cdt else x.to(cdt, memory_format=torch.channels_last)
        if xc.data_ptr() % 16:
            return None
        xs = xc if keep and x.dtype != cdt else None  # backward convolves xc
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        ptr = [t.data_ptr() for t in params]
        flat = None
        if self.cast_slots:
            flat = torch.empty((self.cast_total,), device=device, dtype=cdt)
            base = flat.data_ptr()
            args = []
            for i, offset, size in self.cast_slots:
                args += (ptr[i], base + offset, size)
                ptr[i] = base + offset
            args += (base, base, 0) * (_kernels._CAST_SLOTS - len(self.cast_slots))
            self.cast(stream, *args, base, 1)
        y = torch.empty((p, c), device=device, dtype=cdt)
        yp = y.data_ptr()
        self.conv.conv(stream, xc.data_ptr(), ptr[_DW], 0, yp)
        out = torch.empty_strided(self.shape, self.strides, device=device, dtype=self.out_dtype)
        out_lp = (torch.empty_strided(self.shape, self.strides, device=device, dtype=cdt)
                  if self.emit else None)
        h = mean = rstd = None
        if keep:
            mean = torch.empty((p,), device=device, dtype=torch.float32)
            rstd = torch.empty((p,), device=device, dtype=torch.float32)
        if self.fused:
            if keep:
                h = torch.empty((p, 4 * c), device=device, dtype=cdt)
                hp, mp, rp = h.data_ptr(), mean.data_ptr(), rstd.data_ptr()
            else:
                hp = mp = rp = yp
            self.mlp(stream, yp, ptr[1], x.data_ptr(), ptr[2], ptr[3], ptr[_W1], ptr[_B1],
                     ptr[_W2], ptr[_B2], ptr[_GAMMA], out.data_ptr(),
                     (out_lp if self.emit else out).data_ptr(), hp, mp, rp, p, self.eps)
            return out, y, h, mean, rstd, xs, out_lp
        xn = torch.empty((p, c), device=device, dtype=cdt)
        xnp = xn.data_ptr()
        self.ln(stream, yp, ptr[1], ptr[2], ptr[3], xnp,
                mean.data_ptr() if keep else xnp, rstd.data_ptr() if keep else xnp, p, c,
                self.eps)
        if self.linear_gelu is not None:
            g = torch.empty((p, 4 * c), device=device, dtype=cdt)
            self.linear_gelu(stream, xnp, ptr[_W1], ptr[_B1], g.data_ptr(), p)
        else:  # cuBLAS, then aten's GELU; every operand in cdt: autocast casts nothing
            h = torch.addmm(self._in_compute_dtype(flat, params, _B1, (4 * c,), (1,)), xn,
                            self._in_compute_dtype(flat, params, _W1, (c, 4 * c), (1, c)))
            g = F.gelu(h)
            if not keep:
                h = None
        del xn
        z = torch.addmm(self._in_compute_dtype(flat, params, _B2, (c,), (1,)), g,
                        self._in_compute_dtype(flat, params, _W2, (4 * c, c), (1, 4 * c)))
        del g
        if self.emit:
            self.residual(stream, x.data_ptr(), z.data_ptr(), ptr[_GAMMA], out.data_ptr(),
                          out_lp.data_ptr(), p, c)
        else:
            with torch.autocast(device.type, enabled=False):  # in x's and gamma's dtypes
                torch.addcmul(x.permute(0, 2, 3, 1).reshape(p, c), z, params[_GAMMA],
                              out=out.permute(0, 2, 3, 1).view(p, c))
        return out, y, h, mean, rstd, xs, out_lp


def plan_for(x: Tensor, x_lp: Optional[Tensor], params: Tuple[Tensor, ...], eps: float,
             cdt: torch.dtype, keep: bool, emit: bool) -> Optional[ForwardPlan]:
    """The plan for this call's signature (made on first use), or None where none applies
    (then the general implementation runs). `x`: the channels_last block input; `x_lp`: x
    in cdt, or None; `params`: `ops.block_params`' order; `keep`: keep what backward needs;
    `emit`: also write the output in cdt."""
    key = (x.shape, x.dtype, x.device, cdt, keep, emit, x_lp is not None, eps,
           tuple(t.dtype for t in params))
    plan = _plans.get(key, False)
    if plan is False:
        plan = remember(_plans, key, _build(x, x_lp, params, eps, cdt, keep, emit))
    return plan


def remember(plans: Dict[Tuple, Any], key: Tuple, plan: Any) -> Any:
    """Keeps `plan` (None too: no plan applies) as `plans[key]`, dropping the oldest entry
    beyond `_MAX_PLANS` signatures; returns it."""
    if len(plans) >= _MAX_PLANS:
        plans.pop(next(iter(plans)))
    plans[key] = plan
    return plan


def _build(x: Tensor, x_lp: Optional[Tensor], params: Tuple[Tensor, ...], eps: float,
           cdt: torch.dtype, keep: bool, emit: bool) -> Optional[ForwardPlan]:
    if x.dtype not in (torch.float32, cdt) or not plannable(x, params, cdt):
        return None
    return complete_or_none(lambda: ForwardPlan(x, params, eps, cdt, keep, emit))


def plannable(x: Tensor, params: Tuple[Tensor, ...], cdt: torch.dtype) -> bool:
    """What every block plan needs: half-precision compute; a channels_last, 16-byte
    aligned CUDA tensor x on the current device that the CUDA conv kernel takes (in cdt);
    dense, aligned floating-point CUDA parameters, the conv taps (first) in fp32; Triton's
    direct launches."""
    return (cdt in _HALF and x.is_cuda and x.get_device() == torch.cuda.current_device()
            and x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 == 0
            and _launch.direct_launch_supported()
            and all(t.is_cuda and t.is_floating_point() for t in params)
            and params[0].dtype == torch.float32 and dense_and_aligned(params)
            and cuda_dwconv.supports_input(x.device, cdt, x.shape[1], x.numel()))


def complete_or_none(make: Callable[[], Any]) -> Any:
    """The plan `make` builds, or None where a kernel cannot be built or compiled for
    direct calls (`plan.complete` false)."""
    try:
        plan = make()
    except cuda_dwconv.KernelUnavailable:
        return None
    return plan if plan.complete else None
