"""The depthwise 7x7 conv CUDA kernel (convnext_backbone/ops/dwconv7.cu, cuda_dwconv.py).

CPU (CI): every variant of the conv (CUDA-core and tensor-core) and of the weight-gradient
kernel compiles with NVRTC for Ampere and Hopper without spilling, in at most 128 registers
and within the shared memory it may have (48 KB for the conv; the opt-in limit for the
weight gradient; four tensor-core blocks an SM); the weight gradient's tile width loads the
fewest columns; the tensor-core conv runs where it was measured faster; argument errors
name what is valid; the switches are parsed strictly; CPU tensors are not taken.
GPU (`pytest -m gpu` on the device): both conv kernels against an fp64 conv (and the
weight gradient against its fp64 one) of the same rounded inputs, for each variant and for
shapes that exercise partial strips and tiles, windows larger than the image, and channel
counts whose groups do not fill a block; the weight gradient is the same bit for bit on
every call; and the block uses them, forward and backward, unless
``CONVNEXT_DWCONV=cudnn``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from convnext_backbone import ops
from convnext_backbone.ops import block as fused_block
from convnext_backbone.ops import cuda_dwconv


def _nvrtc_loads() -> bool:
    try:
        cuda_dwconv._load_nvrtc()
        return True
    except OSError:
        return False


# (residual kind, fp32 output): the forward conv; the input gradient with an fp32 residual
# stream, with a half-precision one, and with an fp32 residual but a half-precision dx.
VARIANTS = [(0, False), (1, True), (2, False), (1, False)]


def _compile_without_spills(macros, arch: str):
    """Compiles one variant; asserts a cubin without spills or a stack frame and returns
    (registers a thread, ptxas log)."""
    cubin, log = cuda_dwconv.compile_source(macros, arch, ("--ptxas-options=-v",))
    assert cubin[:4] == b"\x7fELF", macros
    assert re.search(r"\b0 bytes spill stores", log), log
    assert re.search(r"\b0 bytes stack frame", log), log
    return int(re.search(r"Used (\d+) registers", log).group(1)), log


@pytest.mark.skipif(not _nvrtc_loads(), reason="NVRTC (libnvrtc) not loadable")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_every_variant_compiles_without_spills(arch, bf16):
    for residual, out_fp32 in VARIANTS:
        for mirror in (False, True):
            for groups_per_block, copy16 in ((12, True), (12, False), (1, False)):
                macros = cuda_dwconv._macros(bf16, out_fp32, residual, mirror, groups_per_block,
                                             copy16)
                registers, log = _compile_without_spills(macros, arch)
                # 80 or fewer: two blocks of 32 rows x 12 groups (384 threads) per SM
                assert registers <= (80 if groups_per_block == 12 else 128), (macros, registers)
                static = int(re.search(r"(\d+) bytes smem", log).group(1))
                tile = cuda_dwconv._tile_bytes(groups_per_block, cuda_dwconv._MAX_TILE_ROWS)
                # within the opt-in limit of every GPU from sm_80 on (99 KB on sm_86/89)
                assert static + tile <= 99 * 1024, (macros, static, tile)


@pytest.mark.skipif(not _nvrtc_loads(), reason="NVRTC (libnvrtc) not loadable")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_every_tensor_core_variant_compiles_without_spills(arch, bf16):
    for out_fp32 in (False, True):
        for mirror in (False, True):
            for warps in range(1, cuda_dwconv._TC_MAX_WARPS + 1):
                macros = dict(cuda_dwconv._macros(bf16, out_fp32, 0, mirror, 2 * warps),
                              TENSOR_CORES=1)
                registers, _ = _compile_without_spills(macros, arch)
                # 128 or fewer: four blocks of 4 warps per SM (the register file's 64K)
                assert registers <= 128, (macros, registers)
                # four blocks fit the H100's 228 KB per SM, two the A100's 164 KB
                assert cuda_dwconv._tc_smem_bytes(warps) + 1024 <= 228 * 1024 // 4


@pytest.mark.skipif(not _nvrtc_loads(), reason="NVRTC (libnvrtc) not loadable")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_every_weight_gradient_variant_compiles_without_spills(arch, bf16):
    wg_groups = cuda_dwconv._WG_GROUPS
    for groups_per_block, copy16 in ((wg_groups, True), (wg_groups, False), (2, True), (1, False)):
        for tile_w in cuda_dwconv._WG_TILE_WIDTHS:
            macros = cuda_dwconv._wgrad_macros(bf16, groups_per_block, tile_w, copy16)
            registers, _ = _compile_without_spills(macros, arch)
            assert registers <= 128, (macros, registers)
            smem = cuda_dwconv._wgrad_smem_bytes(groups_per_block, tile_w,
                                                 cuda_dwconv._WG_MAX_ROWS)
            assert smem <= (163 if arch == "sm_80" else 227) * 1024, (macros, smem)


@pytest.mark.parametrize("height,max_rows,rows", [(56, 32, 28), (128, 32, 32), (200, 32, 29),
                                                  (7, 32, 7), (56, 16, 14), (33, 16, 11)])
def test_conv_tiles_split_the_image_evenly(height, max_rows, rows):
    assert cuda_dwconv._tile_rows(height, max_rows) == rows


@pytest.mark.parametrize("smem_kb,rows", [(228, 32), (164, 32), (100, 16)])
def test_conv_tiles_are_32_rows_where_two_blocks_fit_an_sm(monkeypatch, smem_kb, rows):
    """H100 (228 KB of shared memory per SM) and A100 (164 KB) take 32-row tiles; sm_86/89
    (100 KB) 16-row ones, so that two blocks stay resident."""
    props = types.SimpleNamespace(shared_memory_per_multiprocessor=smem_kb * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(cuda_dwconv, "_max_rows", {})
    assert cuda_dwconv._max_tile_rows(torch.device("cuda", 0)) == rows


@pytest.mark.parametrize("width,tile_w", [(16, 16), (42, 24), (128, 32), (336, 32), (84, 32),
                                          (7, 16), (200, 32), (168, 24), (100, 24)])
def test_weight_gradient_tiles_load_the_fewest_columns(width, tile_w):
    assert cuda_dwconv._wgrad_tile_width(width) == tile_w


# ConvNeXt-T's forward convs on an H100 (132 SMs, 4 blocks of 4 warps each): whether the
# tensor-core kernel runs them, as measured (do_bench per conv, as in
# tools/microbench_dwconv.py): faster from 14x14 images with 2.5 waves of tiles on, slower
# at 7x7 and at detection's stages 2-4.
@pytest.mark.parametrize("shape,faster", [
    ((128, 96, 56, 56), True), ((128, 192, 28, 28), True), ((128, 384, 14, 14), True),
    ((128, 768, 7, 7), False), ((32, 96, 128, 128), True), ((32, 384, 32, 32), True),
    ((2, 96, 200, 334), True), ((2, 192, 100, 167), False), ((2, 384, 50, 84), False),
    ((2, 768, 25, 42), False)])
def test_tensor_core_conv_runs_where_it_was_measured_faster(monkeypatch, shape, faster):
    monkeypatch.setattr(cuda_dwconv, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cuda_dwconv, "_smem_per_sm", lambda device: 228 * 1024)
    monkeypatch.setattr(cuda_dwconv, "_function", lambda device, kernel, macros, **kw: kernel)
    n, c, h, w = shape
    plan = cuda_dwconv._tc_plan(torch.device("cuda", 0), True, False, False, n, c, h, w)
    assert (plan is not None) == faster
    if plan is not None:  # four blocks of 4 warps an SM, split over the channel blocks
        assert plan.func == "dwconv7_nhwc_tc" and plan.threads == 128
        assert plan.grid == (min(n * -(-h // 16) * -(-w // 16), 4 * 132 // (c // 32)), c // 32)


def test_microbench_names_its_columns_and_needs_a_gpu():
    tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools",
                        "microbench_dwconv.py")
    help_text = subprocess.run([sys.executable, tool, "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--dtype" in help_text
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, tool], capture_output=True, text=True)
        assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_tensor_core_switch_is_checked(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cuda_dwconv, "TENSOR_CORES", "yes")
    with pytest.raises(ValueError, match="'auto', 'always' or 'never'"):
        cuda_dwconv._uses_tensor_cores(8, True, cpu)
    monkeypatch.setattr(cuda_dwconv, "TENSOR_CORES", "never")
    assert not cuda_dwconv._uses_tensor_cores(8, True, cpu)


def test_compile_errors_name_the_variant(monkeypatch, tmp_path):
    if not _nvrtc_loads():
        pytest.skip("NVRTC (libnvrtc) not loadable")
    broken = tmp_path / "dwconv7.cu"
    broken.write_text("this is not CUDA")
    monkeypatch.setattr(cuda_dwconv, "_SOURCE_PATH", broken)
    with pytest.raises(RuntimeError, match="compiling dwconv7.cu for sm_90"):
        cuda_dwconv.compile_source(cuda_dwconv._macros(True, False, 0, False, 12), "sm_90")


def test_argument_errors_name_what_is_valid():
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    taps = torch.randn(8, 1, 7, 7)
    with pytest.raises(ValueError, match="out_dtype must be torch.bfloat16 or torch.float32"):
        cuda_dwconv.depthwise_conv7(x, taps, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        cuda_dwconv.depthwise_conv7(x, taps, residual=torch.zeros(1, 8, 5, 4))
    with pytest.raises(ValueError, match="dtype float32 or torch.bfloat16"):
        cuda_dwconv.depthwise_conv7(x, taps, residual=torch.zeros(1, 8, 5, 5, dtype=torch.float16))


def test_weight_gradient_argument_errors_name_what_is_valid():
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"dy must have x's shape and dtype, got \(1, 8, 5, 4\)"):
        cuda_dwconv.depthwise_conv7_weight_grad(x, torch.zeros(1, 8, 5, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="torch.float16 for x"):
        cuda_dwconv.depthwise_conv7_weight_grad(x, torch.zeros(1, 8, 5, 5, dtype=torch.float16))


def test_cpu_tensors_are_not_taken():
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert not cuda_dwconv.supports(x)


def test_conv_switch_is_parsed_strictly(monkeypatch):
    for name, impl in [("cuda", fused_block.CONV_CUDA), (" CUDNN ", fused_block.CONV_CUDNN),
                       ("triton", fused_block.CONV_TRITON)]:
        monkeypatch.setenv("CONVNEXT_DWCONV", name)
        assert fused_block.conv_impl() == impl
    monkeypatch.delenv("CONVNEXT_DWCONV")
    assert fused_block.conv_impl() == fused_block.CONV_CUDA  # the default
    monkeypatch.setenv("CONVNEXT_DWCONV", "cutlass")
    with pytest.raises(ValueError, match=r"\['cuda', 'cudnn', 'triton'\], got 'cutlass'"):
        fused_block.conv_impl()


@pytest.mark.parametrize("tensor_cores", ["auto", "always"])
def test_block_falls_back_to_cudnn_when_the_kernel_cannot_build(monkeypatch, tensor_cores):
    """A kernel that fails to build (the CUDA-core conv, or with "always" the tensor-core
    one) is switched off with a warning, and the block's conv, input gradient and weight
    gradient go to cuDNN (here: the generic conv, on CPU, with `supports` forced)."""
    monkeypatch.setattr(cuda_dwconv, "supports", lambda x: cuda_dwconv.available())
    monkeypatch.setattr(cuda_dwconv, "_load_libraries", lambda: True)
    monkeypatch.setattr(cuda_dwconv, "_unavailable", None)
    monkeypatch.setattr(cuda_dwconv, "_capability_of", lambda device: (9, 0))
    monkeypatch.setattr(cuda_dwconv, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cuda_dwconv, "_smem_per_sm", lambda device: 228 * 1024)
    monkeypatch.setattr(cuda_dwconv, "TENSOR_CORES", tensor_cores)
    monkeypatch.setattr(cuda_dwconv, "_conv_launches", {})

    attempted = []

    def failing_compile(macros, arch, extra_options=()):
        attempted.append(macros.get("TENSOR_CORES", 0))
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cuda_dwconv, "compile_source", failing_compile)
    monkeypatch.setattr(cuda_dwconv, "_functions", {})
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 11).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    taps = torch.randn(8, 1, 7, 7)
    ref = F.conv2d(x, taps.to(torch.bfloat16), padding=3, groups=8)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        y = fused_block._library_conv_forward(x, taps, taps.to(torch.bfloat16),
                                              fused_block.CONV_CUDA)
    assert torch.equal(y, ref)
    assert attempted == [1 if tensor_cores == "always" else 0]  # 9x11: too small for "auto"
    assert not cuda_dwconv.available() and "no compiler here" in cuda_dwconv.unavailable_reason()
    dout = torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last)
    dx = fused_block._library_conv_input_grad(
        x, taps, taps.to(torch.bfloat16).flip(-1, -2), dout,
        dout.permute(0, 2, 3, 1).reshape(-1, 8), torch.float32, fused_block.CONV_CUDA)
    torch.testing.assert_close(dx, dout + F.conv2d(x, taps.to(torch.bfloat16).flip(-1, -2),
                                                   padding=3, groups=8).float())
    dy = torch.randn(2, 8, 9, 11).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dw = fused_block._library_conv_weight_grad(dy, x, taps.to(torch.bfloat16),
                                               fused_block.CONV_CUDA)
    xr = x.float().requires_grad_(True)
    ref = torch.autograd.grad(F.conv2d(xr, taps.requires_grad_(True), padding=3, groups=8),
                              taps, dy.float())[0]
    assert dw.dtype == torch.float32 and dw.shape == (8, 1, 7, 7)
    torch.testing.assert_close(dw, ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu

# (N, C, H, W): ConvNeXt-T's stage 1 and 4 at 224^2; a width that is not a multiple of the
# strip (8) with C=200 (50 groups: 10 per block); 23 groups (1 per block); an image smaller
# than the window; one pixel; H=37 (row tiles of 13, the last one cut by the image).
SHAPES = [(2, 96, 56, 56), (1, 768, 7, 7), (3, 200, 13, 21), (2, 92, 33, 17), (2, 20, 3, 2),
          (1, 4, 1, 1), (1, 48, 37, 9)]
# For the tensor-core kernel (channels in 8s; up to 4 warps of 8 a block): 2 and 3 warps a
# block, one channel block of one warp, tiles cut by the image in both axes and several
# tiles per thread block (more tiles than resident blocks).
TENSOR_CORE_SHAPES = [(2, 48, 17, 33), (1, 24, 40, 5), (1, 8, 1, 1), (64, 384, 14, 14)]


def _nhwc_at_offset(shape, dtype: torch.dtype, offset: int) -> torch.Tensor:
    """A channels_last (N, C, H, W) CUDA tensor starting `offset` elements into its storage."""
    n, c, h, w = shape
    buf = torch.randn(n * h * w * c + offset, device="cuda").to(dtype)
    return buf[offset:].view(n, h, w, c).permute(0, 3, 1, 2)


def _reference(x: torch.Tensor, taps: torch.Tensor, mirror: bool) -> torch.Tensor:
    w = taps.to(x.dtype).double()
    if mirror:
        w = w.flip(-1, -2)
    return F.conv2d(x.double(), w, padding=3, groups=x.shape[1])


@gpu
@pytest.mark.parametrize("tensor_cores", ["always", "never"], ids=["tensor-cores", "cuda-cores"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual,out_fp32", VARIANTS)
@pytest.mark.parametrize("mirror", [False, True], ids=["fwd", "mirrored"])
@pytest.mark.parametrize("aligned", [True, False], ids=["16B", "8B"])
def test_gpu_kernel_matches_fp64_conv(tensor_cores, dtype, residual, out_fp32, mirror, aligned,
                                      monkeypatch):
    """Every variant of both kernels against fp64; `8B`: x 8-byte aligned only (the CUDA-core
    kernel's tile copied 8 bytes at a time instead of 16; the tensor-core kernel, which
    loads 16, not taken) and taps 4-byte aligned (copied to an aligned tensor first)."""
    monkeypatch.setattr(cuda_dwconv, "TENSOR_CORES", tensor_cores)
    torch.manual_seed(0)
    for n, c, h, w in SHAPES + TENSOR_CORE_SHAPES:
        x = _nhwc_at_offset((n, c, h, w), dtype, 0 if aligned else 4)
        assert cuda_dwconv._uses_tensor_cores(c, x.data_ptr() % 16 == 0, x.device, residual) == (
            tensor_cores == "always" and aligned and c % 8 == 0 and not residual)
        off = 0 if aligned else 1
        taps = (torch.randn(c * 49 + 1, device="cuda") * 0.2)[off:off + c * 49].view(c, 1, 7, 7)
        ref = _reference(x, taps, mirror)
        res = None
        if residual:
            res = torch.randn(n, c, h, w, device="cuda",
                              dtype=torch.float32 if residual == 1 else dtype)
            ref = ref + res.double()
        out_dtype = torch.float32 if out_fp32 else None
        y = cuda_dwconv.depthwise_conv7(x, taps, mirror=mirror, residual=res, out_dtype=out_dtype)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == (torch.float32 if out_fp32 else dtype)
        if out_fp32:  # only the fp32 summation order differs
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        else:  # one rounding of the fp32 sum to the half-precision type
            assert torch.equal(y, ref.to(dtype)) or (
                (y.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all(), (n, c, h, w)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_weight_gradient_matches_fp64(dtype):
    """The weight gradient in fp32 against fp64 from the same half-precision x and dy: only
    the fp32 summation order differs (cuDNN's bf16 result is 1.7e-3 off here)."""
    torch.manual_seed(0)
    # SHAPES (W=21: 24-wide strips; W<=16: 16-wide), ConvNeXt-T's training stage 1 (8-row
    # tiles, 32-wide strips) and detection stage 1 (25 row tiles, the last strip cut), and
    # a width of 30 (one 32-wide strip, 2 columns past the image).
    # The last two: dy 8-byte aligned only, then x (8-byte copies instead of 16).
    for k, (n, c, h, w) in enumerate(SHAPES + [(32, 96, 128, 128), (2, 96, 200, 336),
                                               (3, 16, 19, 30), (2, 96, 20, 30),
                                               (2, 96, 20, 30)]):
        x = _nhwc_at_offset((n, c, h, w), dtype, 4 if k == len(SHAPES) + 4 else 0)
        dy = _nhwc_at_offset((n, c, h, w), dtype, 4 if k == len(SHAPES) + 3 else 0)
        ref = torch.ops.aten.convolution_backward(
            dy.double(), x.double(), torch.zeros(c, 1, 7, 7, device="cuda", dtype=torch.double),
            [c], [1, 1], [3, 3], [1, 1], False, [0, 0], c, [False, True, False])[1]
        got = cuda_dwconv.depthwise_conv7_weight_grad(x, dy)
        assert got.shape == (c, 1, 7, 7) and got.dtype == torch.float32
        err = float((got.double() - ref).norm() / ref.norm())
        assert err <= 1e-5, ((n, c, h, w), err)
        assert torch.equal(got, cuda_dwconv.depthwise_conv7_weight_grad(x, dy)), (n, c, h, w)


@gpu
def test_gpu_kernel_matches_cudnn_and_takes_any_residual_layout():
    torch.manual_seed(0)
    x = torch.randn(4, 96, 28, 28, device="cuda").to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    taps = torch.randn(96, 1, 7, 7, device="cuda") * 0.2
    cudnn = fused_block._depthwise_conv7(x, taps.to(torch.bfloat16))
    ours = cuda_dwconv.depthwise_conv7(x, taps)
    # Both round one fp32 sum; the order of the sums may differ in the last fp32 bit.
    assert (ours.float() - cudnn.float()).abs().max() <= cudnn.float().abs().max() * 2 ** -7
    res = torch.randn(4, 96, 28, 28, device="cuda")  # NCHW-contiguous: taken as it is
    y = cuda_dwconv.depthwise_conv7(x, taps, mirror=True, residual=res, out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), _reference(x, taps, True) + res.double(),
                               rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("impl,tensor_cores", [("cuda", "always"), ("cuda", "never"),
                                                ("cudnn", "auto")])
def test_gpu_block_uses_the_kernel_forward_and_backward(impl, tensor_cores, monkeypatch):
    """Under bf16 autocast the fast block's forward conv (on the tensor cores or not), its
    input-gradient conv (with the residual gradient added) and its weight gradient run the
    CUDA kernels, and match the reference block; with ``CONVNEXT_DWCONV=cudnn`` they do not
    run it and still match. The general code (plans off) calls the kernels' wrappers; the
    forward and backward plans launch the same kernels directly (3 launches either way)."""
    from convnext_backbone.modeling import ConvNextBlock
    from convnext_backbone.ops import backward_plan, forward_plan

    monkeypatch.setattr(ops, "MIN_TRAIN_ELEMENTS", 0)
    monkeypatch.setenv("CONVNEXT_DWCONV", impl)
    monkeypatch.setattr(cuda_dwconv, "TENSOR_CORES", tensor_cores)
    calls, launches = [], []
    real_launch = cuda_dwconv._Launch.__call__
    monkeypatch.setattr(cuda_dwconv._Launch, "__call__",
                        lambda self, *args: launches.append(1) or real_launch(self, *args))
    real = cuda_dwconv.depthwise_conv7

    def counting(x, taps, **kw):
        calls.append(kw.get("mirror", False))
        return real(x, taps, **kw)

    monkeypatch.setattr(cuda_dwconv, "depthwise_conv7", counting)
    real_wgrad = cuda_dwconv.depthwise_conv7_weight_grad

    def counting_wgrad(x, dy):
        calls.append("wgrad")
        return real_wgrad(x, dy)

    monkeypatch.setattr(cuda_dwconv, "depthwise_conv7_weight_grad", counting_wgrad)
    torch.manual_seed(0)
    block = ConvNextBlock(96, layer_scale_init_value=0.5).cuda().to(
        memory_format=torch.channels_last)
    x = torch.randn(2, 96, 24, 40, device="cuda").contiguous(memory_format=torch.channels_last)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
    for plans in (False, True):
        calls.clear()
        launches.clear()
        res = {}
        with monkeypatch.context() as patch:
            if not plans:
                patch.setattr(forward_plan, "plan_for", lambda *a: None)
                patch.setattr(backward_plan, "plan_for", lambda *a: None)
            for fast in (True, False):
                xi = x.clone().requires_grad_(True)
                with ops.fast_path(fast), torch.autocast("cuda", torch.bfloat16):
                    out = block(xi)
                weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
                (out.float() * weights).sum().backward()
                res[fast] = (out.detach().float(), xi.grad,
                             {n: p.grad.clone() for n, p in block.named_parameters()})
                block.zero_grad(set_to_none=True)
        assert calls == ([False, True, "wgrad"] if impl == "cuda" and not plans else [])
        assert len(launches) == (3 if impl == "cuda" else 0)
        assert rel(res[True][0], res[False][0]) <= 1e-2
        assert rel(res[True][1], res[False][1]) <= 1e-2
        for n in res[False][2]:
            assert rel(res[True][2][n], res[False][2][n]) <= 1e-2, n
