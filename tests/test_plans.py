"""The block forward and backward plans (`convnext_backbone.ops.forward_plan`,
`backward_plan`) and the launch objects they call.

CPU (CI): a compiled Triton launch and a CUDA-kernel launch pass exactly the parameters
they are given (the driver and Triton's launcher mocked), per thread; plans are refused
where they do not apply; the plan cache keeps a bounded number of signatures. GPU
(`pytest -m gpu` on the device): a forward plan's outputs (and, when training, what it
keeps for backward) and a backward plan's gradients are bit for bit the general code's,
for every kind of block and dtype setting; the whole model's eager inference and training
step too; and arguments a plan was not made for fall back.
"""
from __future__ import annotations

import ctypes
import importlib.util
import threading

import pytest
import torch

from convnext_backbone import ConvNextBackbone, ConvNextConfig, ops
from convnext_backbone.ops import _launch, cuda_dwconv

gpu = pytest.mark.gpu


def test_compiled_launch_passes_grid_stream_arguments_and_constexprs(monkeypatch):
    calls = []

    class Kernel:
        function, packed_metadata = "fn", "meta"

        def run(self, *args):
            calls.append(args)

    class Jit:
        arg_names = ["x_ptr", "n", "BLOCK"]
        constexprs = [2]

        def warmup(self, *args, grid, **kwargs):
            calls.append(("warmup", grid, args, kwargs))
            return Kernel()

    monkeypatch.setattr(_launch, "_SUPPORTED", True)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    k = _launch.direct_launch(Jit())
    launch = k.compiled((3, 2), (torch.bfloat16, 64), {"BLOCK": 128, "num_warps": 4})
    assert calls == [("warmup", (3, 2), (torch.bfloat16, 64), {"BLOCK": 128, "num_warps": 4})]
    launch(7, 0x1000, 64)  # a pointer as an int
    assert calls[1] == (3, 2, 1, 7, "fn", "meta", None, None, None, 0x1000, 64, 128)
    # The same specialisation (an aligned bf16 tensor, a size divisible by 16): no warmup.
    k.compiled((5,), (torch.zeros(8, dtype=torch.bfloat16), 32), {"BLOCK": 128, "num_warps": 4})(
        9, 0x2000, 32)
    assert len(calls) == 3 and calls[2][:4] == (5, 1, 1, 9)
    # A constexpr missing from the keywords: no compiled launch (the caller goes the long way).
    assert k.compiled((5,), (torch.bfloat16, 32), {"num_warps": 4}) is None
    monkeypatch.setattr(_launch, "_SUPPORTED", False)
    assert k.compiled((5,), (torch.bfloat16, 32), {"BLOCK": 128, "num_warps": 4}) is None


def test_cuda_launch_passes_its_parameters_per_thread(monkeypatch):
    """`cuda_dwconv._Launch` hands cuLaunchKernel the addresses of the pointers it is
    called with, then of its ints, and each thread fills its own buffers."""
    seen, counts = [], [3, 2]  # pointers and ints of the launch being decoded

    class Driver:
        @staticmethod
        def cuLaunchKernel(func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            addresses = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
            n_ptr, n_int = counts
            pointers = [ctypes.c_uint64.from_address(addresses[k]).value for k in range(n_ptr)]
            ints = [ctypes.c_int.from_address(addresses[n_ptr + k]).value
                    for k in range(n_int)]
            seen.append((func, gx, gy, bx, smem, stream, pointers, ints,
                         threading.get_ident()))
            return 0

    monkeypatch.setattr(cuda_dwconv, "_cuda", Driver)
    launch = cuda_dwconv._Launch("f", (6, 2), 128, 4096, 3, (56, 7))
    launch(11, 0x10, 0x20, 0x30)
    launch(12, 0x40, 0x50, 0x60)
    assert [s[:8] for s in seen] == [("f", 6, 2, 128, 4096, 11, [0x10, 0x20, 0x30], [56, 7]),
                                     ("f", 6, 2, 128, 4096, 12, [0x40, 0x50, 0x60], [56, 7])]
    other = threading.Thread(target=launch, args=(13, 0x70, 0x80, 0x90))
    other.start()
    other.join()
    assert seen[2][6] == [0x70, 0x80, 0x90] and seen[2][8] != seen[0][8]
    # The calling thread's buffers were not touched by the other thread.
    assert list(launch._local.buffers[0]) == [0x40, 0x50, 0x60]
    # A conv launch of the CUDA-core kernel has a residual slot; the tensor-core one not.
    seen.clear()
    counts[:] = [4, 2]
    cuda_dwconv._Launch("g", (1, 1), 32, 0, 4, (5, 6), residual_slot=True).conv(0, 1, 2, 3, 4)
    counts[:] = [3, 2]
    cuda_dwconv._Launch("h", (1, 1), 32, 0, 3, (5, 6)).conv(0, 1, 2, 3, 4)
    assert [(s[0], s[6], s[7]) for s in seen] == [("g", [1, 2, 3, 4], [5, 6]),
                                                  ("h", [1, 2, 4], [5, 6])]


def test_no_plan_for_cpu_tensors_or_full_precision():
    from convnext_backbone.ops import forward_plan

    block = torch.nn.Linear(4, 4)  # any parameters: the dtype checks come first
    x = torch.zeros(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    params = (torch.zeros(16, 1, 7, 7),) + tuple(block.parameters()) * 4
    for keep in (False, True):
        assert forward_plan.plan_for(x, None, params, 1e-6, torch.bfloat16, keep, False) is None
        assert forward_plan.plan_for(x, None, params, 1e-6, torch.float32, keep, False) is None


def test_no_backward_plan_for_cpu_tensors_or_full_precision():
    from convnext_backbone.ops import backward_plan

    c = 16
    x = torch.zeros(2, c, 8, 8).contiguous(memory_format=torch.channels_last)
    params = (torch.zeros(c, 1, 7, 7), torch.zeros(c), torch.ones(c), torch.zeros(c),
              torch.zeros(4 * c, c), torch.zeros(c, 4 * c), torch.zeros(c), torch.ones(c))
    for cdt in (torch.bfloat16, torch.float32):
        y = torch.zeros(2 * 8 * 8, c, dtype=cdt)
        xc = x.to(cdt)
        assert backward_plan.plan_for(x, xc, y, params, torch.float32) is None


def test_plan_cache_is_bounded(monkeypatch):
    """`remember` keeps at most `_MAX_PLANS` signatures, dropping the oldest (refusals are
    remembered too: a signature is judged once)."""
    from convnext_backbone.ops import forward_plan

    monkeypatch.setattr(forward_plan, "_MAX_PLANS", 3)
    plans = {}
    for k in range(5):
        assert forward_plan.remember(plans, (k,), None if k == 2 else f"plan{k}") == (
            None if k == 2 else f"plan{k}")
    assert plans == {(2,): None, (3,): "plan3", (4,): "plan4"}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_linear_gelu_rule_by_shape(monkeypatch):
    """The plans ask whether pwconv1 + GELU is one Triton kernel from sizes alone: half
    precision on Hopper, K in 64s and N in 256s (ConvNeXt's widths from 384 on)."""
    from convnext_backbone.ops import _kernels

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(_kernels, "_capability_of", lambda device: (9, 0))
    assert _kernels.linear_gelu_shape_supported(dev, torch.bfloat16, 384, 1536)
    assert _kernels.linear_gelu_shape_supported(dev, torch.float16, 768, 3072)
    assert not _kernels.linear_gelu_shape_supported(dev, torch.bfloat16, 96, 384)
    assert not _kernels.linear_gelu_shape_supported(dev, torch.float32, 384, 1536)
    monkeypatch.setattr(_kernels, "_capability_of", lambda device: (8, 0))
    assert not _kernels.linear_gelu_shape_supported(dev, torch.bfloat16, 384, 1536)


def _block_args(c: int, x_dtype, param_dtype, cdt, with_lp: bool, n=2, hw=(20, 18)):
    torch.manual_seed(c)
    h, w = hw
    dev = "cuda"
    params = (torch.randn(c, 1, 7, 7, device=dev) * 0.2, torch.randn(c, device=dev) * 0.1,
              1 + torch.randn(c, device=dev) * 0.1, torch.randn(c, device=dev) * 0.1,
              torch.randn(4 * c, c, device=dev) * c ** -0.5, torch.randn(4 * c, device=dev) * 0.1,
              torch.randn(c, 4 * c, device=dev) * (4 * c) ** -0.5, torch.randn(c, device=dev) * 0.1,
              0.5 + torch.rand(c, device=dev))
    params = (params[0],) + tuple(p.to(param_dtype) for p in params[1:])
    x = torch.randn(n, c, h, w, device=dev).to(x_dtype).contiguous(
        memory_format=torch.channels_last)
    x_lp = x.to(cdt) if with_lp and x.dtype != cdt else None
    return x, x_lp, params


# (x dtype, parameter dtype, compute dtype, autocast): autocast over an fp32 model, a model
# in bf16 without autocast, fp16 autocast.
SETTINGS = [(torch.float32, torch.float32, torch.bfloat16, True),
            (torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
            (torch.float32, torch.float32, torch.float16, True)]


@gpu
@pytest.mark.parametrize("c", [96, 192, 384, 768])
@pytest.mark.parametrize("keep", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("emit", [True, False], ids=["feeds-block", "last"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["bf16-autocast", "bf16-model", "fp16-autocast"])
def test_gpu_plan_matches_the_general_code(monkeypatch, c, keep, emit, setting):
    """Same kernels on the same arguments: every output equal bit for bit (fused kernel up
    to C=256; LayerNorm, linear-GELU or cuBLAS + GELU, cuBLAS and the residual above),
    what training keeps for backward too."""
    from convnext_backbone.ops import block as fused_block
    from convnext_backbone.ops import forward_plan

    x_dtype, param_dtype, cdt, autocast = setting
    emit = emit and x_dtype != cdt  # a compute-dtype copy only of a wider residual stream
    x, x_lp, params = _block_args(c, x_dtype, param_dtype, cdt, with_lp=emit)
    args = (x, x_lp, *params, 1e-6, cdt, fused_block.CONV_CUDA, keep, emit)
    with torch.no_grad(), torch.autocast("cuda", cdt, enabled=autocast):
        plan = forward_plan.plan_for(x, x_lp, params, 1e-6, cdt, keep, emit)
        assert plan is not None and plan.fused == (c <= 256)
        got = plan(x, x_lp, params)
        through_impl = fused_block._block_fwd_impl(*args)  # takes the plan when training
        monkeypatch.setattr(forward_plan, "plan_for", lambda *a: None)
        want = fused_block._block_fwd_impl(*args)  # the general code
    assert got is not None and len(got) == len(want) == 7
    names = ["out", "y", "h", "mean", "rstd", "xs", "out_lp"]
    for name, a, b, c_ in zip(names, got, want, through_impl):
        if a is None:  # returned empty by the general code
            assert b.numel() == 0 and c_.numel() == 0, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        assert torch.equal(c_, b), name
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert (got[2] is not None) == keep and (got[6] is not None) == emit
    assert (got[5] is not None) == (keep and x_dtype != cdt)


@gpu
def test_gpu_plan_refuses_arguments_it_was_not_made_for(monkeypatch):
    from convnext_backbone.ops import forward_plan

    x, _, params = _block_args(96, torch.float32, torch.float32, torch.bfloat16, False)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        plan = forward_plan.plan_for(x, None, params, 1e-6, torch.bfloat16, False, False)
        assert plan(x, None, params) is not None
        # x 2 bytes off 16-byte alignment (still channels_last contiguous).
        buf = torch.empty(x.numel() + 1, device="cuda")
        shifted = buf[1:].view(2, 20, 18, 96).permute(0, 3, 1, 2)
        shifted.copy_(x)
        assert plan(shifted, None, params) is None
        assert forward_plan.plan_for(shifted, None, params, 1e-6, torch.bfloat16, False,
                                     False) is plan
        # Not channels_last.
        assert plan(x.contiguous(), None, params) is None
        # A parameter that is not contiguous.
        w1 = params[4].t().contiguous().t()
        assert plan(x, None, params[:4] + (w1,) + params[5:]) is None
        # A launch hook (e.g. a profiler's): Triton's own launches, which call it.
        monkeypatch.setattr(_launch, "_hooks_set", lambda: True)
        assert plan(x, None, params) is None


# Backward: the forward settings, and a stage's first block under autocast (its input is
# the downsampling conv's bf16 output; it returns the fp32 residual stream).
BACKWARD_SETTINGS = SETTINGS + [(torch.bfloat16, torch.float32, torch.bfloat16, True)]


def _backward_args(c: int, setting, channels_last_dout: bool = True):
    """(dout, x, y, h, mean, rstd, params, dx dtype) of `_block_bwd_impl` from a training
    forward (`x`: the saved conv input, in the compute dtype; `params`: its order)."""
    from convnext_backbone.ops import block as fused_block

    x_dtype, param_dtype, cdt, autocast = setting
    x, _, params = _block_args(c, x_dtype, param_dtype, cdt, with_lp=False)
    with torch.no_grad(), torch.autocast("cuda", cdt, enabled=autocast):
        out, y, h, mean, rstd, xs, _ = fused_block._block_fwd_impl(
            x, None, *params, 1e-6, cdt, fused_block.CONV_CUDA, True, False)
    dout = torch.randn_like(out)
    if not channels_last_dout:
        dout = dout.contiguous()
    dw, dw_b, lnw, lnb, w1, _b1, w2, b2, gamma = params
    return (dout, xs if xs.numel() else x, y, h, mean, rstd,
            (dw, dw_b, lnw, lnb, w1, w2, b2, gamma), x_dtype)


@gpu
@pytest.mark.parametrize("c", [96, 192, 384, 768])
@pytest.mark.parametrize("setting", BACKWARD_SETTINGS,
                         ids=["bf16-autocast", "bf16-model", "fp16-autocast", "first-block"])
def test_gpu_backward_plan_matches_the_general_code(monkeypatch, c, setting):
    """Same kernels on the same arguments: every gradient equal bit for bit, in the same
    dtype and shape (the GELU backward forming dout^T gelu(h) up to C=256, cuBLAS's
    product above), also for an incoming gradient that is not channels_last."""
    from convnext_backbone.ops import backward_plan
    from convnext_backbone.ops import block as fused_block

    for channels_last_dout in (True, False):
        dout, x, y, h, mean, rstd, params, dx_dtype = _backward_args(c, setting,
                                                                     channels_last_dout)
        args = (dout, x, y, h, mean, rstd, *params, fused_block.CONV_CUDA, dx_dtype)
        with torch.autocast("cuda", setting[2], enabled=setting[3]):
            plan = backward_plan.plan_for(dout, x, y, params, dx_dtype)
            assert plan is not None and plan.with_m == (c <= 256)
            got = plan(dout, x, y, h, mean, rstd, params)
            through_impl = fused_block._block_bwd_impl(*args)  # takes the plan
            with monkeypatch.context() as patch:
                patch.setattr(backward_plan, "plan_for", lambda *a: None)
                want = fused_block._block_bwd_impl(*args)  # the general code
        assert got is not None and len(got) == len(want) == 10
        names = ["x", "dw_weight", "dw_bias", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2",
                 "gamma"]
        for name, a, b, c_ in zip(names, got, want, through_impl):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
            assert torch.equal(c_, b), name
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[0].dtype == dx_dtype


@gpu
def test_gpu_backward_plan_refuses_arguments_it_was_not_made_for(monkeypatch):
    from convnext_backbone.ops import backward_plan

    dout, x, y, h, mean, rstd, params, dx_dtype = _backward_args(96, SETTINGS[0])
    plan = backward_plan.plan_for(dout, x, y, params, dx_dtype)
    assert plan(dout, x, y, h, mean, rstd, params) is not None

    def shifted(t):  # t's values 2 bytes off 16-byte alignment, its memory format kept
        buf = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        n, c, hh, ww = t.shape
        out = buf[1:].view(n, hh, ww, c).permute(0, 3, 1, 2)
        out.copy_(t)
        return out

    assert plan(shifted(dout), x, y, h, mean, rstd, params) is None
    assert plan(dout, shifted(x), y, h, mean, rstd, params) is None
    assert plan(dout, x.contiguous(), y, h, mean, rstd, params) is None  # not channels_last
    w1 = params[4].t().contiguous().t()  # not contiguous
    assert plan(dout, x, y, h, mean, rstd, params[:4] + (w1,) + params[5:]) is None
    with torch.autocast("cuda", torch.float16):  # cuBLAS would cast to another dtype
        assert plan(dout, x, y, h, mean, rstd, params) is None
    # Signatures without a plan: a full-precision saved input, bf16 conv taps.
    assert backward_plan.plan_for(dout, x.float(), y, params, dx_dtype) is None
    taps = params[0].to(torch.bfloat16)
    assert backward_plan.plan_for(dout, x, y, (taps,) + params[1:], dx_dtype) is None
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)
    assert plan(dout, x, y, h, mean, rstd, params) is None


def _tiny_t(device):
    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[2, 2, 3, 2],
                         out_features=["stage1", "stage2", "stage3", "stage4"],
                         layer_scale_init_value=0.5)
    m = ConvNextBackbone(cfg).to(device).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "gamma" not in name:
                p.normal_(0.0, 0.1)
    return m


@gpu
def test_gpu_model_with_plans_equals_without(monkeypatch):
    """The whole backbone, bf16 autocast: eager inference and a training step with plans
    on and off (every block through the general code): the same features bit for bit,
    the same gradients; plans were really used (9 blocks a forward, 9 a backward)."""
    from convnext_backbone.ops import backward_plan, forward_plan

    m = _tiny_t("cuda")
    x = torch.randn(2, 3, 160, 192, device="cuda").contiguous(memory_format=torch.channels_last)
    used, used_backward = [], []

    def counting(plan_class, calls):
        real_call = plan_class.__call__

        def call(self, *args):
            result = real_call(self, *args)
            calls.append(result is not None)
            return result

        monkeypatch.setattr(plan_class, "__call__", call)

    def run():
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            feats = [f.clone() for f in m(pixel_values=x).feature_maps]
        with ops.fast_path(True, min_train_elements=0), torch.autocast("cuda", torch.bfloat16):
            train_feats = m(pixel_values=x).feature_maps
        sum(f.float().square().mean() for f in train_feats).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        return feats, [f.detach() for f in train_feats], grads

    counting(forward_plan.ForwardPlan, used)
    counting(backward_plan.BackwardPlan, used_backward)
    with_plans = run()
    assert len(used) == 18 and all(used)
    assert len(used_backward) == 9 and all(used_backward)
    monkeypatch.setattr(forward_plan, "plan_for", lambda *args: None)
    monkeypatch.setattr(backward_plan, "plan_for", lambda *args: None)
    without = run()
    for a, b in zip(with_plans[0] + with_plans[1], without[0] + without[1]):
        assert torch.equal(a, b)
    for name, g in without[2].items():
        assert torch.allclose(with_plans[2][name], g, rtol=1e-5, atol=1e-7), name
