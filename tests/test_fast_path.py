"""The fused fast path (convnext_backbone.ops) against the pure-PyTorch reference path.

CPU (CI): dispatch falls back to the reference code, the switches work, and the Triton
kernels' arithmetic is checked through Triton's CPU interpreter on tiny shapes (in a
subprocess, since TRITON_INTERPRET is read at import). GPU (`pytest -m gpu` on the
device): the compiled kernels, fp32 <= 1e-4 and bf16 autocast <= 1e-2 relative, forward
and backward, eager and torch.compile (fullgraph, so a graph break fails).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import unittest.mock

import pytest
import torch

from convnext_backbone import ConvNextBackbone, ConvNextConfig, ops
from convnext_backbone.modeling import ConvNextBlock
from convnext_backbone.ops import cpu as ops_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["stage1", "stage2", "stage3", "stage4"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _model(device: str, frozen_stages: int = 0, **kw) -> ConvNextBackbone:
    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                         out_features=STAGES, layer_scale_init_value=0.5, **kw)
    m = ConvNextBackbone(cfg, frozen_stages=frozen_stages).to(device)
    with torch.no_grad():  # non-trivial weights so every term of every block matters
        for name, p in m.named_parameters():
            if p.dim() == 1 and "gamma" not in name:
                p.normal_(0.0, 0.1).add_(1.0 if "norm" in name and "weight" in name else 0.0)
    return m


def _run(model, x, fast: bool, amp: bool):
    """Outputs, input gradient and parameter gradients on one path."""
    with ops.fast_path(fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model(xi).feature_maps
        gen = torch.Generator(device=x.device).manual_seed(1)
        # random weights: a plain mean of LayerNorm-ed maps has an almost zero gradient
        sum((f.float() * torch.randn(f.shape, device=x.device, generator=gen)).sum()
            for f in feats).backward()
        # names without torch.compile's "_orig_mod." prefix, to compare with eager
        grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone()
                 for n, p in model.named_parameters() if p.requires_grad}
        grads["input"] = xi.grad.detach().clone()
        model.zero_grad(set_to_none=True)
    return [f.detach().float() for f in feats], grads


@pytest.fixture(autouse=True)
def _fast_path_at_every_size(monkeypatch):
    """Test inputs are small: without this, their training blocks would take the reference
    path (`ops.MIN_TRAIN_ELEMENTS`) and fast-vs-reference comparisons would compare the
    reference with itself."""
    monkeypatch.setattr(ops, "MIN_TRAIN_ELEMENTS", 0)


# ----------------------------------------------------------------------------- CPU
def test_small_training_blocks_take_reference_path(monkeypatch):
    monkeypatch.setattr(ops, "fast_path_available", lambda x: True)  # as on a GPU
    monkeypatch.setattr(ops, "MIN_TRAIN_ELEMENTS", 2 * 8 * 16 * 16)
    block = ConvNextBlock(8)
    small, large = torch.randn(1, 8, 16, 16), torch.randn(2, 8, 16, 16)
    assert not ops.use_fast_path(block, small)  # parameters need gradients
    assert ops.use_fast_path(block, large)
    with torch.no_grad():  # inference takes the fast path at any size
        assert ops.use_fast_path(block, small)
    block.requires_grad_(False)
    assert ops.use_fast_path(block, small)


def test_fast_path_switches_restore_state():
    before = (ops.fast_path_enabled(), ops._UNDER_COMPILE, ops.MIN_TRAIN_ELEMENTS)
    with ops.fast_path(False, under_compile=True, min_train_elements=7):
        assert not ops.fast_path_enabled() and ops._UNDER_COMPILE and ops.MIN_TRAIN_ELEMENTS == 7
        assert not ops.use_fast_path(ConvNextBlock(8), torch.randn(1, 8, 4, 4))
    assert (ops.fast_path_enabled(), ops._UNDER_COMPILE, ops.MIN_TRAIN_ELEMENTS) == before
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="non-negative int or None"):
            with ops.fast_path(min_train_elements=bad):
                pass
    assert ops.MIN_TRAIN_ELEMENTS == before[2]


@pytest.mark.parametrize("shape,fused", [
    ((32, 768, 16, 16), True),     # a 32x512^2 training step's stage 4
    ((2, 192, 100, 167), True),    # batch-2 800x1333 detection's stage 2
    ((2, 384, 50, 84), False),     # its stages 3 and 4: host-bound launches
    ((2, 768, 25, 42), False),
    ((8, 384, 32, 32), False)])    # batch 8 at 512^2, stage 3
def test_default_threshold_fuses_training_blocks_by_their_elements(monkeypatch, shape, fused):
    monkeypatch.setattr(ops, "fast_path_available", lambda x: True)  # as on a GPU
    monkeypatch.setattr(ops, "MIN_TRAIN_ELEMENTS", 2**22)  # the default
    block = ConvNextBlock(shape[1])
    x = torch.empty(shape, device="meta")
    assert ops.use_fast_path(block, x) == fused


def test_old_pixel_threshold_variable_is_named_and_ignored():
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "from convnext_backbone import ops; print('threshold', ops.MIN_TRAIN_ELEMENTS)"],
        capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
        env={**os.environ, "CONVNEXT_FAST_PATH_MIN_TRAIN_PIXELS": "0"})
    assert f"threshold {2**22}" in out.stdout
    assert "CONVNEXT_FAST_PATH_MIN_TRAIN_ELEMENTS instead" in out.stderr


def test_min_train_elements_switch_sends_small_training_blocks_to_fast_path(monkeypatch):
    monkeypatch.setattr(ops, "fast_path_available", lambda x: True)  # as on a GPU
    monkeypatch.setattr(ops, "MIN_TRAIN_ELEMENTS", 16384)
    block, small = ConvNextBlock(8), torch.randn(1, 8, 16, 16)
    assert not ops.use_fast_path(block, small)
    with ops.fast_path(min_train_elements=0):
        assert ops.use_fast_path(block, small)
    assert not ops.use_fast_path(block, small)


def test_cpu_dispatch_uses_reference_path():
    block = ConvNextBlock(16, layer_scale_init_value=0.5)
    x = torch.randn(2, 16, 9, 9)
    if not ops._INTERPRET:
        assert not ops.use_fast_path(block, x)  # the Triton path; CPU has its own below
    assert ops.block_supported(block)


def test_block_supported_options():
    assert ops.block_supported(ConvNextBlock(8))
    assert not ops.block_supported(ConvNextBlock(8, use_grn=True, layer_scale_init_value=0.0))
    assert not ops.block_supported(ConvNextBlock(8, layer_scale_init_value=0.0))
    assert not ops.block_supported(ConvNextBlock(8, hidden_act="relu"))
    assert not ops.block_supported(ConvNextBlock(8, hidden_act="gelu_new"))
    dp = ConvNextBlock(8, drop_path=0.2)
    assert not ops.block_supported(dp.train())  # stochastic depth active: reference path
    assert ops.block_supported(dp.eval())


def test_env_var_disables(monkeypatch):
    monkeypatch.setenv("CONVNEXT_FAST_PATH", "0")
    try:
        assert ops.refresh_from_env() is False
    finally:
        monkeypatch.delenv("CONVNEXT_FAST_PATH")
        assert ops.refresh_from_env() is True


# ------------------------------------------------------------- CPU: oneDNN inference path
ONEDNN = ops_cpu.mkldnn_linear_ok()
BLOCK_VARIANTS = {  # every block option the CPU path takes, one model each
    "v1": dict(),
    "v2_grn": dict(use_grn=True, layer_scale_init_value=0.0),
    "gelu_tanh": dict(hidden_act="gelu_new"),
    "relu": dict(hidden_act="relu"),
    "selu": dict(hidden_act="selu"),
    "no_layer_scale": dict(layer_scale_init_value=0.0),
}


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN fused-linear calls, so a test knows which path really ran."""
    for attr, algorithm in [("gelu", "none"), ("gelu", "tanh"), ("relu", "")]:
        ops_cpu.mkldnn_linear_ok(attr, algorithm)  # probe now, so probes are not counted
    calls = []
    real = ops_cpu._linear_add

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops_cpu, "_linear_add", counting)
    return calls


def _cpu_model(**options) -> ConvNextBackbone:
    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                         out_features=STAGES, **{"layer_scale_init_value": 0.5, **options})
    m = ConvNextBackbone(cfg).eval()
    with torch.no_grad():  # non-trivial norms, GRN and layer scale, so every term matters
        for name, p in m.named_parameters():
            if p.dim() == 1 or "grn" in name:
                p.normal_(0.0, 0.3).add_(1.0 if "norm" in name and "weight" in name else 0.0)
    return m


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no usable oneDNN fused linear")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("variant", sorted(BLOCK_VARIANTS))
def test_cpu_inference_path_matches_reference(variant, channels_last, onednn_calls):
    model = _cpu_model(**BLOCK_VARIANTS[variant])
    x = torch.randn(2, 3, 69, 75)  # odd sizes: padding in every stage
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    with torch.no_grad(), ops.fast_path(False):
        ref = model(x).feature_maps
    assert not onednn_calls
    with torch.no_grad():
        fast = model(x).feature_maps
    assert len(onednn_calls) == 5  # every block
    for f, r in zip(fast, ref):
        assert f.shape == r.shape and f.dtype == r.dtype == torch.float32
        assert _rel(f, r) <= 1e-5, variant


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no usable oneDNN fused linear")
def test_cpu_path_only_for_inference(onednn_calls):
    """Autograd (the oneDNN ops have no derivative), autocast, stochastic depth in training,
    FLOP counters, jit tracing and the switches all keep the reference path."""
    block = ConvNextBlock(16, layer_scale_init_value=0.5, drop_path=0.3).eval()
    x = torch.randn(1, 16, 8, 8)
    assert ops.use_cpu_path(block, x) is False  # parameters require grad
    with torch.no_grad():
        assert ops.use_cpu_path(block, x)
        assert not ops.use_cpu_path(block.train(), x)  # drop path active
        block.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not ops.use_cpu_path(block, x)
        assert not ops.use_cpu_path(block, x.double())
        with ops.fast_path(False):
            assert not ops.use_cpu_path(block, x)
        with torch.backends.mkldnn.flags(enabled=False):
            assert not ops.use_cpu_path(block, x)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:  # counters see aten's addmm
            block(x)
        assert counter.get_total_flops() > 2 * 2 * 64 * 16 * 64 and not onednn_calls
        traced = torch.jit.trace(block, x, check_trace=False)  # records aten's ops
        assert "mkldnn" not in str(traced.graph) and not onednn_calls
    out = block(x.requires_grad_(True))
    out.sum().backward()
    assert x.grad is not None and not onednn_calls
    block.requires_grad_(False)
    assert ops.use_cpu_path(block, x.detach())  # frozen model: no grad needed


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no usable oneDNN fused linear")
def test_cpu_path_leaves_hooked_quantized_and_forward_ad_blocks_to_reference(onednn_calls):
    """Layers the CPU path computes itself must be plain and unhooked (observers, FLOP
    counters, quantized or wrapped Linears would silently not run); forward-mode AD and
    functorch transforms need the reference path's rules."""
    torch.manual_seed(0)
    block = ConvNextBlock(16, layer_scale_init_value=0.5).eval().requires_grad_(False)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad(), ops.fast_path(False):
        ref = block(x)
    seen = []
    handle = block.pwconv1.register_forward_hook(lambda *a: seen.append(1))
    assert not ops.use_cpu_path(block, x)
    block(x)
    assert seen and not onednn_calls
    handle.remove()
    quantized = torch.ao.quantization.quantize_dynamic(block, {torch.nn.Linear})
    assert not ops.use_cpu_path(quantized, x)
    assert _rel(quantized(x), ref) < 0.05 and not onednn_calls  # runs (int8), reference path
    tangent = torch.randn_like(x)
    with ops.fast_path(False):
        _, ref_jvp = torch.func.jvp(block, (x,), (tangent,))
    out, jvp = torch.func.jvp(block, (x,), (tangent,))
    assert _rel(out, ref) < 1e-6 and _rel(jvp, ref_jvp) < 1e-6 and not onednn_calls
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual_out = block(fwAD.make_dual(x, tangent))
        assert _rel(fwAD.unpack_dual(dual_out).tangent, ref_jvp) < 1e-6
    assert not onednn_calls
    assert ops.use_cpu_path(block, x)  # and plain again


def test_gpu_gate_requires_plain_unhooked_layers(monkeypatch):
    monkeypatch.setattr(ops, "fast_path_available", lambda x: True)  # as on a GPU
    block = ConvNextBlock(8)
    x = torch.randn(2, 8, 16, 16)
    assert ops.use_fast_path(block, x)
    handle = block.norm.register_forward_pre_hook(lambda *a: None)
    assert not ops.use_fast_path(block, x)
    handle.remove()
    torch.nn.utils.parametrize.register_parametrization(block.pwconv2, "weight",
                                                        torch.nn.Identity())
    assert not ops.use_fast_path(block, x)  # parametrized Linear: its own class


def test_cpu_path_probe_failure_falls_back(monkeypatch):
    """A build whose oneDNN op fails or disagrees is not used: the reference path runs."""
    monkeypatch.setattr(ops_cpu, "_PROBED", {})

    def broken(*args, **kwargs):
        raise RuntimeError("mkldnn::_linear_pointwise unavailable")

    monkeypatch.setattr(ops_cpu, "_linear_pointwise", broken)
    block = ConvNextBlock(16, layer_scale_init_value=0.5).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert not ops.use_cpu_path(block, x)
        out = block(x)  # no error: reference path
        with ops.fast_path(False):
            assert torch.equal(out, block(x))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_direct_launch_keys_follow_triton_specialisation():
    """Two arguments share a direct-launch key exactly when Triton specialises them alike
    (else a kernel compiled for, say, 16-aligned sizes would run on other ones)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from convnext_backbone.ops import _launch
    from convnext_backbone.ops._launch import _spec

    base = torch.zeros(64)
    values = [1, 2, 16, 17, 32, 2**31 - 16, 2**31, 2**31 + 1, -16, 2**40, 0.5, 3.0, True, False,
              None, base, base[1:], base[4:], base.half(), base.half()[8:], base.to(torch.bfloat16)]
    triton_spec = lambda v: native_specialize_impl(BaseBackend, v, False, True, True)  # noqa: E731
    for a in values:
        for b in values:
            same_triton = triton_spec(a) == triton_spec(b)
            assert (_spec(a) == _spec(b)) == same_triton, (a, b)
    # The launch key's inline form is `_spec` itself.
    key = _launch._DirectLaunch(None)._key
    with unittest.mock.patch.object(torch._C, "_cuda_getDevice", lambda: 0, create=True):
        assert key(tuple(values), {"B": 1}) == (0, tuple(map(_spec, values)), (("B", 1),))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_direct_launch_reuses_the_compiled_kernel(monkeypatch):
    """The first call of a specialisation goes through Triton; later ones call the compiled
    kernel's launcher with every parameter in signature order; another specialisation, a
    launch hook or the switch sends the call through Triton again."""
    from convnext_backbone.ops import _launch

    calls = []

    class Kernel:
        function, packed_metadata = "fn", "meta"

        def run(self, *args):
            calls.append(("direct",) + args)

    class Jit:
        arg_names = ["x_ptr", "n", "eps", "BLOCK", "FLAG"]
        constexprs = [3, 4]

        def __getitem__(self, grid):
            def go(*args, **kwargs):
                calls.append(("triton", grid, args, kwargs))
                return Kernel()
            return go

    monkeypatch.setattr(_launch, "_SUPPORTED", True)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    k = _launch.direct_launch(Jit())
    x = torch.zeros(64)
    k[(4,)](x, 32, 1e-6, BLOCK=128, FLAG=True, num_warps=4)
    k[(5, 2)](x, 48, 1e-5, BLOCK=128, FLAG=True, num_warps=4)  # same specialisation
    assert [c[0] for c in calls] == ["triton", "direct"]
    assert calls[1][1:] == (5, 2, 1, 7, "fn", "meta", None, None, None, x, 48, 1e-5, 128, True)
    k[(5,)](x, 47, 1e-5, BLOCK=128, FLAG=True, num_warps=4)  # 47: not divisible by 16
    k[(5,)](x[1:], 48, 1e-5, BLOCK=128, FLAG=True, num_warps=4)  # misaligned pointer
    k[(5,)](x, 48, 1e-5, BLOCK=64, FLAG=True, num_warps=4)  # another constexpr
    assert [c[0] for c in calls[2:]] == ["triton", "triton", "triton"]
    # A constexpr passed positionally would share the key of other values: refused.
    with pytest.raises(TypeError, match=r"constexprs \['BLOCK'\] by keyword"):
        k[(5,)](x, 48, 1e-5, 256, FLAG=True, num_warps=4)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)  # e.g. a profiler's hooks
    k[(5,)](x, 48, 1e-5, BLOCK=128, FLAG=True, num_warps=4)
    assert calls[-1][0] == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_direct_launch_sees_launch_hooks(monkeypatch):
    """Triton's default (empty) hook chains do not count as hooks; an added hook does."""
    from triton import knobs

    from convnext_backbone.ops import _launch

    assert not _launch._hooks_set()
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):
        fn = lambda *args: None  # noqa: E731
        hook.add(fn)
        try:
            assert _launch._hooks_set()
        finally:
            hook.remove(fn)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", lambda *args: None)
    assert _launch._hooks_set()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_direct_launch_matches_installed_triton():
    """The installed Triton launches compiled kernels the way `_DirectLaunch` calls them (a
    newer Triton that does not would turn direct launches off, silently slower)."""
    code = ("from convnext_backbone.ops import _launch; import sys; "
            "sys.exit(0 if _launch.direct_launch_supported() else 1)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "CONVNEXT_TRITON_DIRECT_LAUNCH")}
    assert subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=ROOT),
                          cwd=ROOT).returncode == 0
    off = dict(env, PYTHONPATH=ROOT, CONVNEXT_TRITON_DIRECT_LAUNCH="0")
    assert subprocess.run([sys.executable, "-c", code], env=off, cwd=ROOT).returncode == 1


def _run_in_interpreter(code: str, **env_vars: str) -> str:
    """Runs `code` in a subprocess with Triton's CPU interpreter (and `env_vars` set);
    returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, **env_vars)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_cast_params_scales_and_mirrors_in_triton_interpreter():
    """One launch casts the backward's weights: gamma * W2 (row-scaled in fp32), W1, and the
    conv taps mirrored (flip(2, 3)), the taps even when they already have the dtype."""
    out = _run_in_interpreter("""
        import torch
        from convnext_backbone.ops import _kernels as K
        torch.manual_seed(0)
        w2, w1, taps, gamma = (torch.randn(4, 16), torch.randn(16, 4), torch.randn(4, 1, 7, 7),
                               torch.randn(4))
        a, b, t = K.cast_params((w2, w1, taps), torch.float16, row_scale=gamma, reverse_last=49)
        assert torch.equal(a, (gamma[:, None] * w2).half()) and torch.equal(b, w1.half())
        assert torch.equal(t, taps.flip(2, 3).half()) and t.shape == taps.shape
        t16 = taps.half()
        (t2,) = K.cast_params((t16,), torch.float16, reverse_last=49)
        assert torch.equal(t2, t16.flip(2, 3))
        (same,) = K.cast_params((t16,), torch.float16)
        assert same is t16  # nothing to do: no copy, no launch
        print("OK")
    """)
    assert "OK" in out


def check_ln_mlp(P: int, C: int, device: str, dtype: torch.dtype, tol: float) -> None:
    """`_kernels.ln_mlp_residual` at (P, C) against an fp32 reference that rounds where the
    unfused path rounds: out, its compute-dtype copy, and the saved h, mean, rstd; rows past
    P stay untouched; the inference launch (nothing saved) matches too. Imported by the
    interpreter test's subprocess."""
    import torch.nn.functional as F

    from convnext_backbone.ops import _kernels as K

    g = torch.Generator(device="cpu").manual_seed(P + C)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device)  # noqa: E731
    y = r(P, C).to(dtype)
    yb, lnw, lnb = r(C, scale=0.1), 1 + r(C, scale=0.1), r(C, scale=0.1)
    w1, b1 = r(4 * C, C, scale=C ** -0.5).to(dtype), r(4 * C, scale=0.1)
    w2, b2 = r(C, 4 * C, scale=(4 * C) ** -0.5).to(dtype), r(C, scale=0.1)
    gam, x = r(C), r(P, C)
    xn, mean_r, rstd_r = torch.native_layer_norm(y.float() + yb, [C], lnw, lnb, 1e-6)
    h_r = (xn.to(dtype).float() @ w1.float().t() + b1).to(dtype)
    z = (F.gelu(h_r.float()).to(dtype).float() @ w2.float().t() + b2).to(dtype).float()
    ref = x + gam * z
    buf = torch.full((P + 8, C), float("nan"), device=device)
    lp = torch.empty(P, C, dtype=dtype, device=device)
    h, mean, rstd = K.ln_mlp_residual(y, yb, x, lnw, lnb, 1e-6, w1, b1, w2, b2, gam, buf[:P],
                                      store_h=True, out_lp=lp)
    assert buf[P:].isnan().all()
    inf = torch.empty(P, C, device=device)
    assert K.ln_mlp_residual(y, yb, x, lnw, lnb, 1e-6, w1, b1, w2, b2, gam, inf,
                             store_h=False) is None
    errs = [_rel(buf[:P], ref), _rel(lp.float(), ref), _rel(h.float(), h_r.float()),
            _rel(mean, mean_r.flatten()), _rel(rstd, rstd_r.flatten()), _rel(inf, ref)]
    assert max(errs) < tol, (P, C, errs)


def check_linear_gelu(P: int, C: int, device: str, dtype: torch.dtype, tile, tol: float
                      ) -> None:
    """`_kernels.linear_gelu` at (P, C) -> (P, 4C) against gelu of the product rounded to
    dtype (fp32 reference), every element (masked row tiles, each tile of the grouped
    order); imported by the interpreter test's subprocess."""
    import torch.nn.functional as F

    from convnext_backbone.ops import _kernels as K

    g = torch.Generator(device="cpu").manual_seed(P + C)
    x = torch.randn(P, C, generator=g).to(dtype).to(device)
    w = (torch.randn(4 * C, C, generator=g) * C ** -0.5).to(dtype).to(device)
    b = (torch.randn(4 * C, generator=g) * 0.1).to(device)
    ref = F.gelu((x.float() @ w.float().t() + b).to(dtype).float())
    got = K.linear_gelu(x, w, b, tile=tile)
    assert got.shape == (P, 4 * C) and got.dtype == dtype
    assert _rel(got.float(), ref) < tol, (P, C, _rel(got.float(), ref))
    assert ((got.float() - ref).abs() <= ref.abs() * 2 ** -6 + 2e-2).all(), (P, C)


def check_gelu_bwd_weight_grad_product(P: int, C: int, device: str, dtype: torch.dtype
                                       ) -> None:
    """`_kernels.gelu_bwd` given dout: dh equals the plain GELU backward's (same arithmetic),
    the bias sums match it (summed in another order), and its partial products, summed by
    `layer_scale_grads`, equal dout^T gelu(h) with gelu(h) rounded to dtype (fp64
    reference; fp32 accumulation), as do the layer-scale gradients from them; imported by
    the interpreter test's subprocess."""
    from convnext_backbone.ops import _kernels as K

    g = torch.Generator(device="cpu").manual_seed(P + C)
    h = (torch.randn(P, 4 * C, generator=g) * 2).to(dtype).to(device)
    dg = torch.randn(P, 4 * C, generator=g).to(dtype).to(device)
    do = torch.randn(P, C, generator=g).to(dtype).to(device)
    w2 = torch.randn(C, 4 * C, generator=g).to(device)
    gamma, b2, dsum = (torch.randn(C, generator=g).to(device) for _ in range(3))
    dh_ref, gelu_h, db1_ref = K.gelu_bwd(dg, h)
    dh, parts, db1 = K.gelu_bwd(dg, h, dout=do)
    assert torch.equal(dh, dh_ref) and _rel(db1.double(), db1_ref.double()) < 1e-5
    assert parts.dtype == torch.float32 and parts.shape[1:] == (C, 4 * C)
    m_ref = do.double().t() @ gelu_h.double()
    dw2, db2, dgamma = K.layer_scale_grads(parts, w2, gamma, b2, dsum)
    dw2_ref = gamma.double()[:, None] * m_ref
    dgamma_ref = (w2.double() * m_ref).sum(1) + b2.double() * dsum.double()
    for got, ref in ((dw2, dw2_ref), (dgamma, dgamma_ref), (db2, gamma * dsum)):
        assert _rel(got.double(), ref.double()) < 1e-5, (P, C, _rel(got.double(), ref.double()))
    # The two-dimensional product (the wide blocks' cuBLAS one) gives the same gradients.
    dw2_2d, _, dgamma_2d = K.layer_scale_grads(parts.sum(0), w2, gamma, b2, dsum)
    assert _rel(dw2_2d.double(), dw2_ref) < 1e-5 and _rel(dgamma_2d.double(), dgamma_ref) < 1e-5


if HAS_TRITON:
    import triton
    import triton.language as tl

    from convnext_backbone.ops._kernels import _gelu

    @triton.jit
    def _gelu_values_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, _gelu(tl.load(h_ptr + i, mask=i < n)), mask=i < n)


def check_gelu(device: str) -> None:
    """The kernels' exact GELU (`_kernels._gelu`, erfc in its exponential form, MUFU ex2 and
    rcp on the GPU) at every normal bf16 value |h| < 20 against h/2 erfc(-h/sqrt2) in fp64:
    fp32 relative error <= 2e-6 for h >= -4 and <= 1e-5 down to h = -9 (the exponent's
    rounding grows with h^2; below, the value is under 1e-18), and rounded to bf16 the
    correctly rounded GELU at all but 16 of the values where Phi(h) is a normal float, one
    unit off there. Imported by the interpreter test's subprocess."""
    import math

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    h = bits.view(torch.bfloat16).float()
    h = h[torch.isfinite(h) & (h.abs() < 20) & (h.abs() > 1e-37)]
    exact = torch.tensor([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in h.double().tolist()],
                         dtype=torch.float64)
    out = torch.empty_like(h, device=device)
    _gelu_values_kernel[(triton.cdiv(h.numel(), 1024),)](h.to(device), out, h.numel(), BLOCK=1024)
    out = out.cpu()
    upper = h > -9
    rel = (out.double() - exact).abs() / exact.abs().clamp_min(1e-300)
    assert float(rel[h >= -4].max()) <= 2e-6, float(rel[h >= -4].max())
    assert float(rel[upper].max()) <= 1e-5, float(rel[upper].max())
    assert float((out.double() - exact).abs()[~upper].max()) < 1e-18
    # Where Phi(h) is subnormal (h < -13) the GPU flushes it to zero (ex2.approx.ftz), and
    # with it the GELU (under 1e-36).
    normal = (exact / h).abs() >= 2.0 ** -126
    assert float(out[~normal].abs().max()) < 1e-36
    mine, right = out[normal].to(torch.bfloat16), exact[normal].float().to(torch.bfloat16)
    off = mine != right
    assert int(off.sum()) <= 16, int(off.sum())
    ulps = (mine[off].view(torch.int16).int() - right[off].view(torch.int16).int()).abs()
    assert ulps.numel() == 0 or int(ulps.max()) == 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_gelu_matches_erfc_in_triton_interpreter():
    out = _run_in_interpreter("""
        import sys
        sys.path.insert(0, "tests")  # (another installed package may be called "tests")
        from test_fast_path import check_gelu
        check_gelu("cpu")
        print("OK")
    """)
    assert "OK" in out


def check_stem(n: int, c: int, h: int, w: int, channels_last: bool, device: str,
               dtype: torch.dtype, tol: float) -> None:
    """`_kernels.stem_patchify_ln` (4x4 patches of a 3-channel image, `c` outputs) against an
    fp32 reference that rounds where autocast's stem rounds (image, weights, conv output,
    bias add): the output, its compute-dtype copy, the saved conv output and statistics;
    the inference launch (nothing saved) gives the same output. Imported by the interpreter
    test's subprocess."""
    import torch.nn.functional as F

    from convnext_backbone.ops import _kernels as K

    g = torch.Generator(device="cpu").manual_seed(c + h)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device)  # noqa: E731
    x = r(n, 3, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt, b, lnw, lnb = r(c, 3, 4, 4, scale=0.3), r(c, scale=0.5), 1 + r(c, scale=0.1), r(c, scale=0.1)
    conv = F.conv2d(x.to(dtype).float(), wt.to(dtype).float(), stride=4).to(dtype).float()
    y_r = (conv + b.to(dtype).float()[:, None, None]).to(dtype).permute(0, 2, 3, 1).reshape(-1, c)
    ref, mean_r, rstd_r = torch.native_layer_norm(y_r.float(), [c], lnw, lnb, 1e-6)
    out, lp, y, mean, rstd = K.stem_patchify_ln(x, wt, b, lnw, lnb, 1e-6, dtype, torch.float32,
                                                emit_lp=True, keep_for_backward=True)
    inf, none_lp, *nothing = K.stem_patchify_ln(x, wt, b, lnw, lnb, 1e-6, dtype, torch.float32,
                                                emit_lp=False, keep_for_backward=False)
    assert none_lp is None and nothing == [None, None, None]
    assert out.shape == (n * (h // 4) * (w // 4), c) and lp.dtype == y.dtype == dtype
    errs = [_rel(out, ref), _rel(lp.float(), ref), _rel(y.float(), y_r.float()),
            _rel(mean, mean_r.flatten()), _rel(rstd, rstd_r.flatten()), _rel(inf, ref)]
    assert max(errs) < tol, (n, c, h, w, channels_last, errs)


@pytest.mark.parametrize("h,w,channels_last,dtype", [
    (16, 20, True, torch.float32), (18, 13, False, torch.float32), (32, 32, True, torch.float16)])
def test_stem_weight_grad_product_is_conv_weight_grad(h, w, channels_last, dtype):
    """The fused stem's backward takes the patch conv's weight gradient as one product
    (dy's rows against the image's patches) when the image needs no gradient: equal to
    aten's convolution_backward on the same rounded operands, NCHW and NHWC images, sizes
    not a multiple of the patch (the conv drops the rest)."""
    from convnext_backbone.ops.stem import _patch_conv_weight_grad

    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, 3, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 3, 4, 4, generator=g)
    dy4 = torch.randn(2, 8, h // 4, w // 4, generator=g).to(dtype)
    dy = dy4.permute(0, 2, 3, 1).reshape(-1, 8).contiguous()
    ref = torch.ops.aten.convolution_backward(
        dy4.float(), x.to(dtype).float(), weight, None, [4, 4], [0, 0], [1, 1], False, [0, 0],
        1, [False, True, False])[1]
    got = _patch_conv_weight_grad(dy, x, 4, dtype)
    assert got.dtype == dtype and got.shape == (8, 48)
    assert _rel(got.view(weight.shape).double(), ref.double()) < (1e-6 if dtype == torch.float32
                                                                  else 1e-3)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_stem_kernel_and_dispatch_in_triton_interpreter():
    """The fused stem kernel (`check_stem`, fp16: NCHW and NHWC images, widths padded to
    the tile and not, row tiles ending inside the patches), and its dispatch: autocast
    half-precision only, a non-overlapping patch conv with bias, no hooks; the model hands
    the stem's compute-dtype copy to the first block and keeps none on its outputs."""
    out = _run_in_interpreter("""
        import sys
        import torch
        from convnext_backbone import ConvNextBackbone, ConvNextConfig, ops
        from convnext_backbone.ops import block as fb
        sys.path.insert(0, "tests")  # (another installed package may be called "tests")
        from test_fast_path import check_stem
        for n, c, h, w, cl in [(2, 96, 20, 36, True), (1, 40, 12, 8, False), (3, 16, 4, 28, True)]:
            check_stem(n, c, h, w, cl, "cpu", torch.float16, 2e-3)
        m = ConvNextBackbone(ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[2, 1, 1, 1],
                                            out_features=["stem", "stage1"]))
        stem = m.downsample_layers[0]
        conv, norm = stem
        x = torch.randn(1, 3, 32, 32)
        fast = lambda t: ops.use_fast_stem(stem, conv, norm, t)
        assert not fast(x)  # fp32: cuDNN's conv and the LayerNorm kernel
        with torch.autocast("cpu", torch.float16):
            assert fast(x) and not fast(x[:, :, :30])  # not a multiple of the patch
            h = conv.register_forward_hook(lambda *a: None)
            assert not fast(x)
            h.remove()
            conv.stride = (2, 2)  # overlapping patches
            assert not fast(x)
            conv.stride = (4, 4)
            with ops.fast_path(False):
                assert not fast(x)
        # The first block convolves the stem's copy; nothing stays attached to the outputs.
        # (CPU autocast keeps the LayerNorm's output in fp16; CUDA's makes it fp32 and the
        # copy worth handing on: emulated here.)
        from convnext_backbone.ops import stem as fs
        fs.output_dtype = lambda t, cdt: torch.float32
        attached, taken = [], []
        attach, take = ops.attach_low_precision_copy, fb._take_low_precision_copy
        ops.attach_low_precision_copy = lambda t, c: attached.append(t) or attach(t, c)
        fb._take_low_precision_copy = lambda t, cdt: taken.append((t, take(t, cdt))) or taken[-1][1]
        with torch.no_grad(), ops.fast_path(False):
            ref = m(x).feature_maps[1]
        for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
            attached.clear()
            taken.clear()
            with mode(), torch.autocast("cpu", torch.float16):
                outs = m(x, output_hidden_states=True)
            stem_out, copy = taken[0]
            assert stem_out is attached[0] and stem_out.dtype == torch.float32
            assert stem_out.data_ptr() == outs.hidden_states[0].data_ptr()
            assert torch.equal(copy, stem_out.half()), mode
            assert not any(fb._LOW_PRECISION_ATTR in t.__dict__ for t in attached)
            assert (outs.feature_maps[1].float() - ref).abs().max() < 1e-2
        # A first block that does not take the copy (a pre-hook may change its input): the
        # copy is dropped. Only the stem to run: none is made.
        hook = m.stages[0][0].register_forward_pre_hook(lambda mod, inp: None)
        attached.clear()
        taken.clear()
        with torch.inference_mode(), torch.autocast("cpu", torch.float16):
            m(x)
        hook.remove()
        assert len(attached) == 1 and fb._LOW_PRECISION_ATTR not in attached[0].__dict__
        assert taken[0][0] is not attached[0]  # the hooked block took nothing
        m1 = ConvNextBackbone(ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                             out_features=["stem"]))
        attached.clear()
        with torch.inference_mode(), torch.autocast("cpu", torch.float16):
            m1(x)
        assert attached == []
        print("OK")
    """, CONVNEXT_FAST_PATH_MIN_TRAIN_ELEMENTS="0")
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_downsample_layer_norm_writes_compute_dtype_in_triton_interpreter():
    """Under autocast a downsampling layer's LayerNorm kernel writes the compute dtype for
    the conv (instead of fp32 that the conv casts back): the same output and gradients,
    bit for bit, as the layer called as a module. Not taken without autocast or with a
    hook; the model's trunk takes it."""
    out = _run_in_interpreter("""
        import torch
        from convnext_backbone import ConvNextBackbone, ConvNextConfig, ops
        from convnext_backbone.ops import _kernels as K
        torch.manual_seed(0)
        m = ConvNextBackbone(ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                            out_features=["stage2"]))
        layer = m.downsample_layers[1]
        norm, conv = layer
        x = torch.randn(2, 16, 8, 12).contiguous(memory_format=torch.channels_last)
        assert not ops.use_fast_downsample(layer, norm, conv, x)  # fp32: nothing to save
        written = []
        ln_fwd = K.ln_fwd
        K.ln_fwd = lambda *a, **k: written.append(a[4]) or ln_fwd(*a, **k)
        with torch.autocast("cpu", torch.float16):
            assert ops.use_fast_downsample(layer, norm, conv, x)
            for hooked in (layer, norm, conv):
                h = hooked.register_forward_pre_hook(lambda *a: None)
                assert not ops.use_fast_downsample(layer, norm, conv, x)
                h.remove()
            res = []
            for fast in (True, False):
                xg = x.clone().requires_grad_()
                written.clear()
                y = ops.downsample_forward(norm, conv, xg) if fast else layer(xg)
                assert written == [torch.float16 if fast else torch.float32]
                (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
                res.append([y.detach(), xg.grad] + [p.grad for p in layer.parameters()])
                layer.zero_grad(set_to_none=True)
            assert all(torch.equal(a, b) for a, b in zip(*res))
            written.clear()
            m(torch.randn(1, 3, 64, 64))
            assert torch.float16 in written  # the trunk's downsampling layer
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_ln_mlp_output_parts_in_triton_interpreter():
    """The fused LN-MLP kernel splits its output columns into a power of two and a rest
    (48 = 32 + 16; 112 = 64 + a 48-wide part padded to 64 and masked; 64 alone), and
    builds the LayerNorm output once per tile (`check_ln_mlp`, fp16, tiles ending inside
    the pixels included)."""
    out = _run_in_interpreter("""
        import sys
        import torch
        from convnext_backbone.ops import _kernels as K
        sys.path.insert(0, "tests")  # (another installed package may be called "tests")
        from test_fast_path import check_ln_mlp
        assert [K._out_parts(c) for c in (48, 112, 64, 96, 192)] == [
            (32, 16), (64, 64), (64, 0), (64, 32), (128, 64)]
        for P, C in [(70, 48), (64, 112), (33, 64)]:
            check_ln_mlp(P, C, "cpu", torch.float16, 2e-3)
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_linear_gelu_in_triton_interpreter():
    """pwconv1 + GELU in one kernel (half-precision inference of wide blocks): the default
    tile, and a small one over 5 row tiles (the last cut by P) x 2 column tiles in groups of
    2 (the last group of one); shapes it cannot take are refused, naming what it needs."""
    out = _run_in_interpreter("""
        import sys
        import pytest
        import torch
        from convnext_backbone.ops import _kernels as K
        sys.path.insert(0, "tests")
        from test_fast_path import check_linear_gelu
        check_linear_gelu(70, 64, "cpu", torch.float16, None, 2e-3)
        check_linear_gelu(300, 128, "cpu", torch.float16, (64, 256, 64, 4, 3, 2), 2e-3)
        x, w = torch.zeros(4, 96, dtype=torch.float16), torch.zeros(384, 96, dtype=torch.float16)
        with pytest.raises(ValueError, match="K a multiple of 64"):
            K.linear_gelu(x, w, torch.zeros(384))
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_gelu_bwd_weight_grad_product_in_triton_interpreter():
    """The GELU backward that also forms pwconv2's weight-gradient product (C <= 256, half
    precision; fp16 here: the interpreter has no bf16 product), through
    `check_gelu_bwd_weight_grad_product`: padded widths (48 -> 64 channels, 192 -> 256), row
    tiles cut by P, several programs' partial products; other dout is refused, naming what
    it needs."""
    out = _run_in_interpreter("""
        import sys
        import pytest
        import torch
        from convnext_backbone.ops import _kernels as K
        sys.path.insert(0, "tests")
        from test_fast_path import check_gelu_bwd_weight_grad_product
        for P, C in [(37, 48), (300, 16), (70, 192)]:
            check_gelu_bwd_weight_grad_product(P, C, "cpu", torch.float16)
        assert K.gelu_bwd_m_supported(256, torch.bfloat16)
        assert not K.gelu_bwd_m_supported(384, torch.float16)
        assert not K.gelu_bwd_m_supported(96, torch.float32)
        h = torch.zeros(8, 1536, dtype=torch.float16)
        with pytest.raises(ValueError, match="C <= 256"):
            K.gelu_bwd(h, h, dout=torch.zeros(8, 384, dtype=torch.float16))
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_column_sums_in_triton_interpreter():
    """`column_sums` (the partial-sum reduction) equals sum(0): one row, more rows than one
    tile (1500 > 1024), a strided band; other dtypes and strides are refused."""
    out = _run_in_interpreter("""
        import pytest
        import torch
        from convnext_backbone.ops import _kernels as K
        torch.manual_seed(0)
        for R, W in [(1, 5), (37, 300), (528, 768), (1500, 70)]:
            x = torch.randn(R, W)
            assert torch.allclose(K.column_sums(x), x.sum(0), rtol=1e-5, atol=1e-4), (R, W)
            band = torch.randn(R, W + 7)[:, 3:3 + W]
            assert torch.allclose(K.column_sums(band), band.sum(0), rtol=1e-5, atol=1e-4)
        for bad in (torch.zeros(4, 8).half(), torch.zeros(8, 4).t()):
            with pytest.raises(ValueError, match="fp32 rows with unit column stride"):
                K.column_sums(bad)
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_column_sums_bands_equal_separate_sums_in_triton_interpreter():
    """The backward's three row kernels write their partial column sums into bands of one
    `ColumnSums` buffer (a kernel with fewer programs than the buffer has rows zeroes the
    rest); the one reduction equals each kernel's own sums. A band too small is refused."""
    out = _run_in_interpreter("""
        import torch
        from convnext_backbone.ops import _kernels as K
        torch.manual_seed(0)
        for P, C in [(37, 16), (300, 32)]:
            do = torch.randn(P, C)
            dg, h = torch.randn(P, 4 * C).half(), torch.randn(P, 4 * C).half()
            y, dxn = torch.randn(P, C).half(), torch.randn(P, C).half()
            mean, rstd = torch.randn(P), torch.rand(P) + 0.5
            lnw, lnb, yb = torch.randn(C), torch.randn(C), torch.randn(C)
            _, dsum = K.cast_colsum(do, torch.float16)
            _, _, db1 = K.gelu_bwd(dg, h)
            _, _, dw, db, ds = K.ln_bwd(y, dxn, mean, rstd, lnw, lnb, torch.float16, yb,
                                        sum_dy=True)
            sums = K.ColumnSums(P, C, (C, 4 * C, 3 * C), do.device)
            sums._buf.fill_(float("nan"))  # rows no program writes would show
            K.cast_colsum(do, torch.float16, part=sums.band(0))
            K.gelu_bwd(dg, h, part=sums.band(1))
            K.ln_bwd(y, dxn, mean, rstd, lnw, lnb, torch.float16, yb, sum_dy=True,
                     part=sums.band(2))
            s_do, s_dh, s_ln = sums.finish()
            ref = torch.cat([dsum, db1, dw, db, ds])
            got = torch.cat([s_do, s_dh, s_ln])
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4), (got - ref).abs().max()
        try:
            K.cast_colsum(do, torch.float16, part=torch.empty((1, C)))
        except ValueError as e:
            assert "rows >=" in str(e)
        else:
            raise AssertionError("a one-row band was accepted")
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_block_bwd_op_copies_aliasing_gradients_apart(monkeypatch):
    """Eager backward may return small gradients as views of one reduced vector; the custom
    op (what torch.compile calls) must not return aliasing outputs, so it copies them."""
    from convnext_backbone.ops import block as fb

    base = torch.arange(12.0)
    grads = (torch.ones(2), base[:4], base[4:8], torch.zeros(3), base[8:])
    monkeypatch.setattr(fb, "_block_bwd_impl", lambda *args: grads)
    out = fb._block_bwd_op_impl()
    ptrs = [t.untyped_storage().data_ptr() for t in out]
    assert len(set(ptrs)) == len(out)
    assert all(torch.equal(a, b) for a, b in zip(out, grads))
    assert out[1] is grads[1] and out[0] is grads[0]  # the first user of a storage keeps it


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("conv_impl,amp", [("cudnn", False), ("triton", False), ("cudnn", True),
                                           ("triton", True)])
def test_kernels_match_reference_in_triton_interpreter(conv_impl, amp):
    """The Triton kernels (forward, LayerNorm backward, conv input and weight gradients)
    run on CPU through Triton's interpreter and must match the reference: fp32 (<= 1e-4),
    and fp16 autocast (<= 1e-2), where blocks of width <= 256 run the fused
    LayerNorm-MLP-residual kernel (the interpreter has no bf16 matrix product) and the
    320-wide stage the unfused sequence. Inference (no autograd) is checked too."""
    code = """
        import os, torch
        from convnext_backbone import ConvNextBackbone, ConvNextConfig, ops
        from convnext_backbone.ops import _kernels
        assert ops._INTERPRET
        amp = os.environ["AMP"] == "1"
        widths = [16, 32, 48, 320] if amp else [8, 16, 24, 40]
        if amp:
            assert [_kernels.ln_mlp_supported(c, torch.float16) for c in widths] == [True, True, True, False]
        torch.manual_seed(0)
        # Two blocks in stages 2 and 4: the first writes the second's low-precision input.
        cfg = ConvNextConfig(hidden_sizes=widths, depths=[1, 2, 1, 2],
                             out_features=["stage1", "stage2", "stage3", "stage4"],
                             layer_scale_init_value=0.5)
        m = ConvNextBackbone(cfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.1)
        x0 = torch.randn(2, 3, 40, 72)
        res, infer = {}, {}
        for fast in (True, False):
            x = x0.clone().requires_grad_(True)
            with ops.fast_path(fast), torch.autocast("cpu", torch.float16, enabled=amp):
                blk = m.stages[0][0]
                assert ops.use_fast_path(blk, torch.randn(1, widths[0], 4, 4)) == fast
                out = m(x).feature_maps
                with torch.no_grad():
                    infer[fast] = [f.float() for f in m(x0).feature_maps]
                with torch.inference_mode():  # the blocks hand on copies inside each stage
                    assert all(torch.equal(f.float(), i)
                               for f, i in zip(m(x0).feature_maps, infer[fast]))
            g = torch.Generator().manual_seed(1)
            sum((f.float() * torch.randn(f.shape, generator=g)).sum() for f in out).backward()
            res[fast] = ([f.detach().float() for f in out],
                         {n: p.grad.clone() for n, p in m.named_parameters()}, x.grad.clone())
            m.zero_grad(set_to_none=True)
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
        worst = max(rel(a, b) for a, b in zip(res[True][0], res[False][0]))
        worst_i = max(rel(a, b) for a, b in zip(infer[True], infer[False]))
        worst_g = max(rel(res[True][1][n], res[False][1][n]) for n in res[False][1])
        worst_x = rel(res[True][2], res[False][2])
        print("ERR", worst, worst_i, worst_g, worst_x)
        tol = 1e-2 if amp else 1e-4
        assert max(worst, worst_i, worst_g, worst_x) < tol, (worst, worst_i, worst_g, worst_x)
        if amp:  # the compute-dtype copy handed to the next block (fused and wide blocks)
            from convnext_backbone.ops import block as fb
            attr = fb._LOW_PRECISION_ATTR
            for stage in (m.stages[1], m.stages[3]):
                c = stage[0].dwconv.in_channels
                t = torch.randn(2, c, 5, 9).contiguous(memory_format=torch.channels_last)
                triton_conv = os.environ["CONVNEXT_DWCONV"] == "triton"  # reads x directly
                with torch.inference_mode(), torch.autocast("cpu", torch.float16):
                    # No version counter: a copy only inside the stage's loop over its blocks.
                    assert attr not in stage[0](t).__dict__
                    with ops.block_sequence():
                        mid_i = stage[0](t)
                        if not triton_conv:
                            copy_i, version = mid_i.__dict__[attr]
                            assert version is None and torch.equal(copy_i, mid_i.half())
                        out_i = stage[1](mid_i)
                        assert attr not in mid_i.__dict__ and attr not in out_i.__dict__
                    if not triton_conv:  # a stray one is not trusted outside the loop
                        mid_i.__dict__[attr] = (copy_i * 2, None)
                        assert torch.equal(stage[1](mid_i), out_i)
                with torch.no_grad(), torch.autocast("cpu", torch.float16):
                    mid = stage[0](t)
                    if triton_conv:
                        assert attr not in mid.__dict__
                        continue
                    copy, _ = mid.__dict__[attr]
                    assert torch.equal(copy, mid.half()) and mid.dtype == torch.float32
                    # x already in the compute dtype (a downsampling conv's output under
                    # autocast): the block still returns fp32 and hands on its copy.
                    mid_h = stage[0](t.half())
                    copy_h, _ = mid_h.__dict__.pop(attr)
                    assert mid_h.dtype == torch.float32 and torch.equal(copy_h, mid_h.half())
                    ref = stage[1](mid.clone())
                    out = stage[1](mid)
                    assert attr not in mid.__dict__  # taken by the next block
                    assert attr not in out.__dict__  # the stage's last block writes none
                    assert torch.equal(out, ref)
                    # The next block really convolves the copy: a wrong one shows.
                    mid.__dict__[attr] = (copy * 2, mid._version)
                    assert not torch.equal(stage[1](mid), ref)
                    # ... unless the tensor changed since: then it is cast afresh.
                    mid.__dict__[attr] = (copy * 2, mid._version)
                    mid.mul_(1.0)
                    assert torch.equal(stage[1](mid), ref)
    """
    out = _run_in_interpreter(code, CONVNEXT_DWCONV=conv_impl,
                              CONVNEXT_FAST_PATH_MIN_TRAIN_ELEMENTS="0", AMP="1" if amp else "0")
    assert "ERR" in out


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons at 1e-4 need TF32 off; restored so later tests see the defaults."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_gpu_fast_path_matches_reference(amp, channels_last):
    m = _model("cuda")
    x = torch.randn(2, 3, 96, 160, device="cuda")
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    assert ops.use_fast_path(m.stages[0][0], x[:, :16])
    stem = m.downsample_layers[0]
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        assert ops.use_fast_stem(stem, *stem, x) == amp  # the fused stem: half precision only
    f_fast, g_fast = _run(m, x, True, amp)
    f_ref, g_ref = _run(m, x, False, amp)
    tol = 1e-2 if amp else 1e-4
    for a, b in zip(f_fast, f_ref):
        assert _rel(a, b) <= tol
    for name in g_ref:
        assert _rel(g_fast[name], g_ref[name]) <= tol, name


@gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_gpu_direct_launches_match_triton_launches(monkeypatch, amp):
    """Kernels launched directly (the second step on: same specialisations) compute what
    Triton's own launches compute, and direct launches really happen."""
    from convnext_backbone.ops import _kernels, _launch

    m = _model("cuda").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 160, device="cuda").contiguous(memory_format=torch.channels_last)
    kernels = [k for k in vars(_kernels).values() if isinstance(k, _launch._DirectLaunch)]
    monkeypatch.setattr(_launch, "_SUPPORTED", False)
    f_triton, g_triton = _run(m, x, True, amp)
    monkeypatch.setattr(_launch, "_SUPPORTED", True)
    _run(m, x, True, amp)  # compiles nothing new; fills the direct-launch caches
    hits = []

    class Counting:  # a cached kernel whose direct launches are counted
        def __init__(self, kernel):
            self.kernel, self.function = kernel, kernel.function
            self.packed_metadata = kernel.packed_metadata

        def run(self, *args):
            hits.append(1)
            return self.kernel.run(*args)

    for k in kernels:  # restored after the test, with the caches themselves
        monkeypatch.setattr(k, "_cache", {key: (Counting(kernel), trailing)
                                          for key, (kernel, trailing) in k._cache.items()})
    f_direct, g_direct = _run(m, x, True, amp)
    assert len(hits) > 10
    for a, b in zip(f_direct, f_triton):
        assert _rel(a, b) <= 1e-6
    for name in g_triton:  # cuDNN's weight gradient may sum in another order
        assert _rel(g_direct[name], g_triton[name]) <= 1e-5, name


@gpu
@pytest.mark.parametrize("cudnn_benchmark", [False, True])
def test_gpu_direct_cudnn_depthwise_conv_is_aten_conv(cudnn_benchmark, monkeypatch):
    """The block's depthwise conv calls cuDNN's op directly for half-precision channels_last
    input: the same result as F.conv2d (which dispatches to the same kernel), bit for bit."""
    from convnext_backbone.ops.block import _depthwise_conv7

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", cudnn_benchmark)
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for n, c, h, w in [(2, 96, 56, 56), (3, 200, 13, 5), (1, 768, 7, 7)]:
            x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            wt = torch.randn(c, 1, 7, 7, device="cuda", dtype=dtype)
            out = _depthwise_conv7(x, wt)
            ref = torch.nn.functional.conv2d(x, wt, None, padding=3, groups=c)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(out, ref), (dtype, c)


@gpu
def test_gpu_odd_sizes_and_wide_channels():
    # Widths that are not powers of two, spatial sizes below the 7x7 window.
    torch.manual_seed(0)
    for c, h, w in [(96, 3, 5), (200, 13, 1), (768, 7, 7)]:
        block = ConvNextBlock(c, layer_scale_init_value=0.5).cuda()
        x = torch.randn(3, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
        res = {}
        for fast in (True, False):
            xi = x.clone().requires_grad_(True)
            with ops.fast_path(fast):
                out = block(xi)
                (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
            res[fast] = (out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
            block.zero_grad(set_to_none=True)
        assert _rel(res[True][0], res[False][0]) <= 1e-4
        assert _rel(res[True][1], res[False][1]) <= 1e-4
        for n in res[False][2]:
            assert _rel(res[True][2][n], res[False][2][n]) <= 1e-4, (c, h, w, n)


@gpu
def test_gpu_gelu_matches_erfc():
    """`check_gelu` compiled: the MUFU ex2 and rcp instructions the interpreter stands in for."""
    check_gelu("cuda")


@gpu
@pytest.mark.parametrize("C", [96, 112, 128, 192, 256])
def test_gpu_ln_mlp_kernel_matches_reference(C):
    """The compiled fused LN-MLP kernel (bf16, Hopper MMA) at ConvNeXt-T/B's widths and one
    whose output rest is padded and masked (112 = 64 + 48): `check_ln_mlp`, <= 1e-2."""
    check_ln_mlp(1000, C, "cuda", torch.bfloat16, 1e-2)


@gpu
@pytest.mark.parametrize("P,C", [(1000, 384), (257, 768)])
def test_gpu_linear_gelu_matches_reference(P, C):
    """The compiled pwconv1 + GELU kernel (bf16, Hopper MMA) at ConvNeXt-T's stage 3 and 4
    widths, its default tile."""
    check_linear_gelu(P, C, "cuda", torch.bfloat16, None, 1e-2)


@gpu
@pytest.mark.parametrize("P,C", [(32 * 128 * 128, 96), (2 * 100 * 167, 192), (1000, 40)])
def test_gpu_gelu_bwd_weight_grad_product(P, C):
    """The compiled GELU backward with pwconv2's weight-gradient product (bf16, Hopper MMA)
    at ConvNeXt-T's training stage 1 and detection stage 2 sizes and a padded width:
    `check_gelu_bwd_weight_grad_product`."""
    check_gelu_bwd_weight_grad_product(P, C, "cuda", torch.bfloat16)


@gpu
def test_gpu_wide_inference_blocks_use_linear_gelu(monkeypatch):
    """bf16 inference blocks of width >= 384 run pwconv1 + GELU as one kernel on Hopper
    (elsewhere cuBLAS + GELU), fused training blocks never (they keep h for backward);
    outputs match the reference path. Counted in the kernels' wrappers (the general code)
    and in the forward and backward plans' calls (`tests/test_plans.py`)."""
    from convnext_backbone.ops import _kernels, backward_plan, forward_plan

    calls, gelu_bwd_calls = [], []
    real, real_gelu_bwd = _kernels.linear_gelu, _kernels.gelu_bwd
    monkeypatch.setattr(_kernels, "linear_gelu", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(_kernels, "gelu_bwd",
                        lambda *a, **k: gelu_bwd_calls.append(1) or real_gelu_bwd(*a, **k))
    real_forward = forward_plan.ForwardPlan.__call__
    real_backward = backward_plan.BackwardPlan.__call__

    def planned_forward(plan, *args):
        result = real_forward(plan, *args)
        if result is not None and plan.linear_gelu is not None:
            calls.append(1)
        return result

    def planned_backward(plan, *args):
        result = real_backward(plan, *args)
        if result is not None:  # its launches include the GELU backward's
            gelu_bwd_calls.append(1)
        return result

    monkeypatch.setattr(forward_plan.ForwardPlan, "__call__", planned_forward)
    monkeypatch.setattr(backward_plan.BackwardPlan, "__call__", planned_backward)
    monkeypatch.setattr(ops, "MIN_TRAIN_ELEMENTS", 0)  # these small training blocks fused too
    cfg = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[1, 1, 2, 1],
                         out_features=STAGES)
    m = ConvNextBackbone(cfg).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 160, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        got = m(x).feature_maps
        with ops.fast_path(False):
            want = m(x).feature_maps
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert len(calls) == (3 if hopper else 0)
    for a, b in zip(got, want):
        assert _rel(a.float(), b.float()) <= 1e-2
    calls.clear()
    with torch.autocast("cuda", torch.bfloat16):
        m.train()(x.requires_grad_(True)).feature_maps[-1].float().sum().backward()
    assert not calls and len(gelu_bwd_calls) == sum(cfg.depths)  # every block took the fused path


@gpu
@pytest.mark.parametrize("c,channels_last", [(96, True), (96, False), (128, True), (40, True)])
def test_gpu_stem_kernel_matches_reference(c, channels_last):
    """The compiled stem kernel (bf16 tensor-core product over 4x4x3 patches): `check_stem`,
    ConvNeXt-T/B's widths and a narrow one, NHWC and NCHW images, <= 5e-3."""
    check_stem(2, c, 68, 100, channels_last, "cuda", torch.bfloat16, 5e-3)


@gpu
def test_gpu_torch_compile_fullgraph_matches():
    m = _model("cuda").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    f_ref, g_ref = _run(m, x, False, True)
    with ops.fast_path(True, under_compile=True):  # the fused custom ops inside the graph
        compiled = torch.compile(m, fullgraph=True)  # a graph break raises
        f_c, g_c = _run(compiled, x, True, True)
    for a, b in zip(f_c, f_ref):
        assert _rel(a, b) <= 1e-2
    for name in g_ref:
        assert _rel(g_c[name], g_ref[name]) <= 1e-2, name


@gpu
def test_gpu_compile_defaults_to_reference_path_for_inductor_fusion():
    import torch._dynamo

    m = _model("cuda")
    x = torch.randn(1, 3, 64, 64, device="cuda")
    explained = torch._dynamo.explain(m)(x)
    code = "".join(g.code for g in explained.graphs)
    assert explained.graph_break_count == 0 and "block_fwd" not in code
    with ops.fast_path(True, under_compile=True):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(x)
    assert "block_fwd" in "".join(g.code for g in explained.graphs)


@gpu
def test_gpu_compiled_inference_takes_fused_mlp_for_narrow_blocks():
    # Under torch.compile, no-grad half-precision blocks of width <= 256 keep the fused op
    # (the 4C activation never reaches memory); wider ones and training go to Inductor.
    import torch._dynamo

    from convnext_backbone.ops import _kernels

    cfg = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[1, 1, 2, 1],
                         out_features=STAGES)
    m = ConvNextBackbone(cfg).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 160, device="cuda").contiguous(memory_format=torch.channels_last)
    narrow = sum(_kernels.ln_mlp_supported(c, torch.bfloat16) for c, d in zip(cfg.hidden_sizes, cfg.depths) for _ in range(d))
    assert narrow == 2
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0
        code = "".join(g.code for g in explained.graphs)
        assert code.count("ops.convnext_backbone.block_fwd") == narrow, code
        torch._dynamo.reset()
        got = torch.compile(m, fullgraph=True)(x).feature_maps
        with ops.fast_path(False):
            want = m(x).feature_maps
    for a, b in zip(got, want):
        assert _rel(a.float(), b.float()) <= 1e-2


@gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", [96, 200, 768])
def test_gpu_layer_norm_2d_matches_reference(c, amp):
    from convnext_backbone.modeling import LayerNorm2d

    torch.manual_seed(0)
    ln = LayerNorm2d(c, eps=1e-6).cuda()
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.2)
        ln.bias.normal_(0.0, 0.2)
    dtype = torch.bfloat16 if amp else torch.float32
    x = (torch.randn(3, c, 11, 13, device="cuda") * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    res = {}
    for fast in (True, False):
        with ops.fast_path(fast), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            assert ops.use_fast_layer_norm(ln, x) == fast
            y = ln(x)
        g = torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        (y.float() * g).sum().backward()
        res[fast] = (y.detach(), x.grad.clone(), ln.weight.grad.clone(), ln.bias.grad.clone())
        x.grad = None
        ln.zero_grad(set_to_none=True)
    assert res[True][0].dtype == res[False][0].dtype
    assert res[True][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(res[True], res[False]):
        assert _rel(a, b) <= (1e-2 if amp else 1e-5)


@gpu
def test_gpu_gradient_checkpointing_and_frozen(checkpoint_calls):
    m = _model("cuda", frozen_stages=1)
    m.gradient_checkpointing_enable()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    f_fast, g_fast = _run(m, x, True, False)
    f_ref, g_ref = _run(m, x, False, False)
    assert len(checkpoint_calls) == 2 * sum(m.config.depths)  # every block, both runs
    assert not any(n.startswith("stages.0.") for n in g_ref)  # stage 1 frozen: no grads
    for a, b in zip(f_fast, f_ref):
        assert _rel(a, b) <= 1e-4
    for name in g_ref:
        assert _rel(g_fast[name], g_ref[name]) <= 1e-4, name


@gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_gpu_cuda_graph_replays_match_eager_steps(train, amp):
    """A step captured as a CUDA graph (forward, and for training the loss and backward)
    and replayed on new inputs, after the weights changed in place as an optimizer changes
    them, gives what the same step gives eagerly: nothing the fast path decides or computes
    on the host (weight casts, kernel choice, the compute-dtype copies handed between
    blocks) is baked into the graph with stale values."""
    m = _model("cuda").to(memory_format=torch.channels_last).train(train)
    shape = (2, 3, 96, 160)
    static_x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
    assert ops.use_fast_path(m.stages[0][0], static_x[:, :16])
    gen = torch.Generator(device="cuda").manual_seed(1)
    loss_weights = [torch.randn(f.shape, device="cuda", generator=gen)
                    for f in m(static_x).feature_maps]

    def step(x):
        grad_ctx = contextlib.nullcontext() if train else torch.inference_mode()
        # autocast's weight-cast cache must be off under capture (PyTorch's CUDA graph rule)
        with grad_ctx, torch.autocast("cuda", torch.bfloat16, enabled=amp, cache_enabled=False):
            feats = m(x).feature_maps
        if train:
            sum((f.float() * w).sum() for f, w in zip(feats, loss_weights)).backward()
        return feats

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and loads every kernel before the capture
        for _ in range(2):
            step(static_x)
            m.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_feats = step(static_x)
    params = [p for p in m.parameters() if p.requires_grad]
    graph_grads = [p.grad for p in params]
    tol = 1e-3 if amp else 1e-5
    for _ in range(2):
        with torch.no_grad():
            for p in params:  # a large change: a stale cast of any weight would show
                p.add_(torch.randn(p.shape, device="cuda", generator=gen), alpha=0.05)
        x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
        static_x.copy_(x)
        graph.replay()
        got = [f.float().clone() for f in static_feats]
        got_grads = [g.clone() for g in graph_grads] if train else []
        for p in params:
            p.grad = None
        want = step(x)
        assert len(got) == len(want) == 4
        for a, b in zip(got, want):
            assert _rel(a, b.float()) <= tol
        for p, g in zip(params, got_grads):
            assert _rel(g, p.grad) <= tol
        for p, g in zip(params, graph_grads):
            p.grad = g
