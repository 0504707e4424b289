"""ConvNeXt's depthwise 7x7 conv and its weight gradient as CUDA kernels (``dwconv7.cu``),
built at run time.

cuDNN's depthwise kernels are far from the hardware's limits on NHWC half-precision input
(an H100 inference step at 128x224^2 spends 2.3 ms of 7.75 in them, where the conv's
multiply-adds alone need about 0.4 ms), and none of three Triton designs beat them: Triton
cannot keep a sliding window of input pixels in registers. This kernel does (see the
source's header). On an H100, summed over ConvNeXt-T's blocks, it takes 1.47 ms for that
step's convs (cuDNN: 2.29), and 3.72 ms (cuDNN: 6.70) for a 32x512^2 training step's
forward convs, input-gradient convs and the residual adds it fuses. The weight gradient
(`depthwise_conv7_weight_grad`) takes 1.80 ms in that training step (cuDNN: 2.41) and
0.76 in a 2x800x1333 detection step (cuDNN: 1.88), and sums in fp32 where cuDNN returns
bf16. (cuDNN's times are from earlier sweeps on the same GPU model.)

On GPUs from sm_80 on, the forward conv of images with channels in 8s, at least 12 pixels
a side and enough tiles to fill the GPU 2.5 times (`_tc_pays`) runs on the tensor cores
instead (``dwconv7_nhwc_tc``: per channel and tap row, a 16-row tile's sums are one
product with a band matrix of the 7 taps; see the source): 1.26 against 1.46 ms for that
inference step's convs and 1.25 against 1.49 ms for the training step's forward convs
(H100). The input-gradient conv, which adds the residual gradient, keeps the CUDA-core
kernel (on par there).

It is compiled by NVRTC, which CUDA builds of PyTorch ship and load, so nothing is needed
beyond torch: no nvcc, no build step, no download. Each variant (dtype, output dtype,
residual, mirrored taps, channels per block, 16- or 8-byte copies; for the weight
gradient, the tile width) is
compiled once per process and device capability (about 0.2 s), loaded into the device's
primary context, and launched through the driver's ``cuLaunchKernel`` on the current
stream.

Where NVRTC or the driver cannot be loaded, or a variant fails to compile or load, the
kernels are switched off for the process with a warning (`unavailable_reason` says why),
`supports` answers False, and callers use cuDNN (`depthwise_conv7` or
`depthwise_conv7_weight_grad` raises `KernelUnavailable` for the call that found it).
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["available", "unavailable_reason", "supports", "supports_input", "depthwise_conv7",
           "conv_launch", "depthwise_conv7_weight_grad", "wgrad_launch", "compile_source",
           "KernelUnavailable", "PIX"]

_SOURCE_PATH = Path(__file__).with_name("dwconv7.cu")
PIX = 8  # output pixels along W per thread (dwconv7.cu's PIX)
_VEC = 4  # channels per thread (dwconv7.cu's VEC): one 8-byte load
_MAX_GROUPS_PER_BLOCK = 12
_MAX_TILE_ROWS = 32  # dwconv7.cu's MAX_TILE_ROWS: with 12 groups, 71 KB of shared memory
_SMALL_TILE_ROWS = 16  # where two blocks of _MAX_TILE_ROWS do not fit an SM
_lock = threading.Lock()
_nvrtc: Optional[ctypes.CDLL] = None
_cuda: Optional[ctypes.CDLL] = None
_unavailable: Optional[str] = None
_cubins: Dict[Tuple, bytes] = {}
_functions: Dict[Tuple, ctypes.c_void_p] = {}
_modules = []  # loaded modules stay loaded for the life of the process
_capability: Dict[int, Tuple[int, int]] = {}
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class KernelUnavailable(RuntimeError):
    """The kernel cannot run in this process (see `unavailable_reason`); use cuDNN."""


def _load_nvrtc() -> ctypes.CDLL:
    global _nvrtc
    if _nvrtc is None:
        major = str(torch.version.cuda or "").split(".")[0]
        errors = []
        for name in (f"libnvrtc.so.{major}", "libnvrtc.so"):
            try:
                _nvrtc = ctypes.CDLL(name)
                break
            except OSError as err:
                errors.append(str(err))
        else:
            raise OSError("; ".join(errors))
        _nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    return _nvrtc


def _load_libraries() -> bool:
    """Whether NVRTC and the CUDA driver load (else `_unavailable` says why)."""
    global _cuda, _unavailable
    if _cuda is None and _unavailable is None:
        try:
            _load_nvrtc()
            cuda = ctypes.CDLL("libcuda.so.1")
            cuda.cuLaunchKernel.argtypes = [
                ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p]
            _cuda = cuda
        except OSError as err:
            _unavailable = f"cannot load NVRTC or the CUDA driver: {err}"
    return _cuda is not None


def _check_nvrtc(nvrtc: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"NVRTC {what} failed: {nvrtc.nvrtcGetErrorString(code).decode()}")


def _check_cuda(cuda: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        msg = ctypes.c_char_p()
        cuda.cuGetErrorString(code, ctypes.byref(msg))
        raise RuntimeError(f"CUDA driver {what} failed ({code}): "
                           f"{msg.value.decode() if msg.value else 'unknown error'}")


def _macros(elem_bf16: bool, out_fp32: bool, residual: int, mirror: bool,
            groups_per_block: int, copy16: bool = False) -> Dict[str, int]:
    return {"ELEM_BF16": int(elem_bf16), "OUT_FP32": int(out_fp32), "RESIDUAL": residual,
            "MIRROR_TAPS": int(mirror), "GROUPS_PER_BLOCK": groups_per_block,
            "COPY16": int(copy16)}


def _copy16(groups_per_block: int, aligned16: bool) -> bool:
    # 16-byte copies take two channel groups: an even count a block, 16-byte aligned data.
    return groups_per_block % 2 == 0 and aligned16


def compile_source(macros: Dict[str, int], arch: str, extra_options: Tuple[str, ...] = ()
                   ) -> Tuple[bytes, str]:
    """(cubin, compile log) for one variant, e.g. ``arch="sm_90"``. Needs no GPU."""
    nvrtc = _load_nvrtc()
    source = _SOURCE_PATH.read_bytes()
    prog = ctypes.c_void_p()
    _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"dwconv7.cu",
                                                 0, None, None), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device",
                   *(f"-D{k}={v}" for k, v in sorted(macros.items())), *extra_options]
        c_options = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = nvrtc.nvrtcCompileProgram(prog, len(options), c_options)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        log_text = log.value.decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"compiling dwconv7.cu for {arch} with {macros} failed:\n{log_text}")
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "GetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "GetCUBIN")
        return cubin.raw, log_text
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def _function(device: torch.device, kernel: str, macros: Dict[str, int],
              dynamic_smem: int = 0) -> ctypes.c_void_p:
    """The loaded `kernel` of the variant `macros` on `device` (with an index), allowed
    `dynamic_smem` bytes of dynamic shared memory (above 48 KB needs the opt-in)."""
    variant = (kernel, tuple(macros.items()))  # the builders' fixed order: no sort per call
    key = (device.index, variant)
    func = _functions.get(key)
    if func is not None:
        return func
    global _unavailable
    with _lock:
        func = _functions.get(key)
        if func is not None:
            return func
        if not _load_libraries():
            raise KernelUnavailable(_unavailable)
        try:
            arch = "sm_%d%d" % _capability_of(device)
            if (arch, variant) not in _cubins:
                _cubins[arch, variant] = compile_source(macros, arch)[0]
            module, func = ctypes.c_void_p(), ctypes.c_void_p()
            with torch.cuda.device(device):
                _check_cuda(_cuda, _cuda.cuModuleLoadData(ctypes.byref(module),
                                                          _cubins[arch, variant]),
                            "cuModuleLoadData")
                _check_cuda(_cuda, _cuda.cuModuleGetFunction(ctypes.byref(func), module,
                                                             kernel.encode()),
                            "cuModuleGetFunction")
                if dynamic_smem > 48 * 1024:
                    _check_cuda(_cuda, _cuda.cuFuncSetAttribute(
                        func, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        ctypes.c_int(dynamic_smem)), "cuFuncSetAttribute")
        except (RuntimeError, OSError) as err:
            _unavailable = f"the depthwise-conv CUDA kernels could not be built: {err}"
            warnings.warn(_unavailable + "; cuDNN runs the depthwise convs instead",
                          RuntimeWarning, stacklevel=3)
            raise KernelUnavailable(_unavailable) from err
        _modules.append(module)
        _functions[key] = func
    return func


def available() -> bool:
    """Whether the kernel may run here: NVRTC and the driver load, and no variant has failed
    to build."""
    return _load_libraries() and _unavailable is None


def unavailable_reason() -> Optional[str]:
    return _unavailable


def supports(x: Tensor) -> bool:
    """Whether `depthwise_conv7` takes this conv input: a half-precision channels_last CUDA
    tensor with channels in groups of 4, on a GPU of compute capability 8.0 or newer."""
    return (x.is_cuda and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and x.data_ptr() % 8 == 0 and supports_input(x.device, x.dtype, x.shape[1], x.numel()))


def supports_input(device: torch.device, dtype: torch.dtype, channels: int, numel: int) -> bool:
    """`supports` for a CUDA channels_last input of this dtype, channels and size, 8-byte
    aligned."""
    return (dtype in (torch.bfloat16, torch.float16) and channels % _VEC == 0
            and numel < 2**31 and _capability_of(device)[0] >= 8 and available())


def _capability_of(device: torch.device) -> Tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability.get(index)
    if cap is None:
        cap = _capability[index] = torch.cuda.get_device_capability(index)
    return cap


def _groups_per_block(groups: int) -> int:
    # A divisor of the channel groups, so that every block has the same channel count.
    return max(d for d in range(1, min(groups, _MAX_GROUPS_PER_BLOCK) + 1) if groups % d == 0)


def _tile_bytes(groups_per_block: int, tile_rows: int) -> int:
    # dwconv7.cu's input tile: (tile_rows + 6) rows of ROW_STRIDE 8-byte entries.
    return (tile_rows + 6) * ((PIX + 6) * groups_per_block + 4) * 8


def _tile_rows(height: int, max_rows: int) -> int:
    # As many rows as evenly split the image into tiles of at most max_rows (56 -> 28).
    tiles = -(-height // max_rows)
    return -(-height // tiles)


def _static_smem_bytes(groups_per_block: int) -> int:
    # dwconv7.cu's tap_tile and raw_taps: 49 fp32 taps of each channel, twice.
    return 2 * 49 * groups_per_block * _VEC * 4


_max_rows: Dict[int, int] = {}


def _max_tile_rows(device: torch.device) -> int:
    """_MAX_TILE_ROWS where two such blocks fit an SM's shared memory (H100: 228 KB, A100:
    164 KB; measured on the H100, 6% faster than 16-row tiles), else _SMALL_TILE_ROWS
    (sm_86/89: 100 KB), so that one block's sums hide another's copies."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    rows = _max_rows.get(index)
    if rows is None:
        per_sm = _smem_per_sm(device)
        block = (_tile_bytes(_MAX_GROUPS_PER_BLOCK, _MAX_TILE_ROWS)
                 + _static_smem_bytes(_MAX_GROUPS_PER_BLOCK) + 1024)  # 1 KB reserved a block
        rows = _max_rows[index] = _MAX_TILE_ROWS if per_sm >= 2 * block else _SMALL_TILE_ROWS
    return rows


def depthwise_conv7(x: Tensor, taps: Tensor, *, mirror: bool = False,
                    residual: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.conv2d(x, w, padding=3, groups=C)`` with w = `taps` rounded to x's dtype (as
    autocast rounds the weight), mirrored in both spatial axes with `mirror` (the conv's
    input gradient), accumulated in fp32, plus `residual` if given (added in fp32), returned
    in `out_dtype` (default x's dtype) as a channels_last NCHW tensor.

    x: (N, C, H, W) with `supports(x)`; taps: (C, 1, 7, 7) or (C, 49), any float dtype;
    residual: x's shape, fp32 or x's dtype. Without a residual, shapes where it is the
    faster kernel run on the tensor cores (`TENSOR_CORES`, `_tc_pays`); the sums are the
    same fp32 sums in another order."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # The launch goes to the current context: make it x's device's (aten ops do the same).
        with torch.cuda.device(x.device):
            return depthwise_conv7(x, taps, mirror=mirror, residual=residual,
                                   out_dtype=out_dtype)
    n, c, h, w = x.shape
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be {x.dtype} or torch.float32, got {out_dtype}")
    taps = taps.reshape(c, 49)
    if taps.dtype != torch.float32 or not taps.is_contiguous() or taps.data_ptr() % 16:
        taps = taps.float().clone()  # the kernel reads them four at a time
    residual_kind = 0
    if residual is not None:
        if residual.shape != x.shape or residual.dtype not in (torch.float32, x.dtype):
            raise ValueError("residual must have the input's shape and dtype float32 or "
                             f"{x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
        residual = residual.contiguous(memory_format=torch.channels_last)
        residual_kind = 1 if residual.dtype == torch.float32 else 2
        if residual.data_ptr() % 16:
            residual = residual.clone(memory_format=torch.channels_last)
    launch = conv_launch(x.device, x.dtype, out_dtype, n, c, h, w, x.data_ptr() % 16 == 0,
                         mirror=mirror, residual_kind=residual_kind)
    out = x.new_empty((n, h, w, c), dtype=out_dtype).permute(0, 3, 1, 2)
    launch.conv(torch._C._cuda_getCurrentRawStream(x.device.index), x.data_ptr(),
                taps.data_ptr(), residual.data_ptr() if residual is not None else 0,
                out.data_ptr())
    return out


class _Launch:
    """A built kernel's launch worked out for one shape: function, grid, threads, shared
    memory and int parameters; called with the stream and the pointer parameters (the
    kernels take the pointers first, then the ints). Eager steps are bound by the host's
    time per launch, so the parameter buffers are made once per thread and refilled (once
    per thread: ctypes lets other threads run during cuLaunchKernel)."""

    __slots__ = ("func", "grid", "threads", "smem", "ints", "residual_slot", "_pointers",
                 "_local")

    def __init__(self, func: ctypes.c_void_p, grid: Tuple[int, int], threads: int, smem: int,
                 pointers: int, ints: Tuple[int, ...], residual_slot: bool = False) -> None:
        self.func, self.grid, self.threads, self.smem = func, grid, threads, smem
        self.ints, self.residual_slot, self._pointers = ints, residual_slot, pointers
        self._local = threading.local()

    def _buffers(self):
        c_pointers = (ctypes.c_uint64 * self._pointers)()
        c_ints = (ctypes.c_int * len(self.ints))(*self.ints)
        p0, i0 = ctypes.addressof(c_pointers), ctypes.addressof(c_ints)
        # cuLaunchKernel takes the parameters' addresses.
        params = (ctypes.c_void_p * (self._pointers + len(self.ints)))(
            *(p0 + 8 * k for k in range(self._pointers)),
            *(i0 + 4 * k for k in range(len(self.ints))))
        buffers = self._local.buffers = (c_pointers, c_ints, params)
        return buffers

    def __call__(self, stream: int, *pointers: int) -> None:
        buffers = getattr(self._local, "buffers", None) or self._buffers()
        buffers[0][:] = pointers
        code = _cuda.cuLaunchKernel(self.func, self.grid[0], self.grid[1], 1, self.threads, 1, 1,
                                    self.smem, stream, buffers[2], None)
        if code:
            _check_cuda(_cuda, code, "cuLaunchKernel")

    def conv(self, stream: int, x: int, taps: int, residual: int, out: int) -> None:
        """A conv launch (the CUDA-core kernel has a residual slot, the tensor-core one not)."""
        if self.residual_slot:
            self(stream, x, taps, residual, out)
        else:
            self(stream, x, taps, out)


_conv_launches: Dict[Tuple, _Launch] = {}


def conv_launch(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype, n: int,
                c: int, h: int, w: int, aligned16: bool, *, mirror: bool = False,
                residual_kind: int = 0) -> _Launch:
    """The launch of `depthwise_conv7` for an (n, c, h, w) input of `dtype` on `device` (an
    indexed CUDA device), worked out once: the tensor-core kernel where it pays
    (`TENSOR_CORES`), else the CUDA-core one. `aligned16`: the input is 16-byte aligned;
    `residual_kind`: 0 none, 1 fp32, 2 the input's dtype. Raises `KernelUnavailable` where
    the kernel cannot be built."""
    key = (device.index, dtype, out_dtype, n, c, h, w, aligned16, mirror, residual_kind,
           TENSOR_CORES)
    launch = _conv_launches.get(key)
    if launch is not None:
        return launch
    if _uses_tensor_cores(c, aligned16, device, residual_kind):
        launch = _tc_plan(device, dtype == torch.bfloat16, out_dtype == torch.float32, mirror,
                          n, c, h, w, force=TENSOR_CORES == "always")
    if launch is None:
        groups = c // _VEC
        gpb = _groups_per_block(groups)
        func = _function(device, "dwconv7_nhwc",
                         _macros(dtype == torch.bfloat16, out_dtype == torch.float32,
                                 residual_kind, mirror, gpb, _copy16(gpb, aligned16)),
                         dynamic_smem=_tile_bytes(gpb, _MAX_TILE_ROWS))
        tile_rows = _tile_rows(h, _max_tile_rows(device))
        strips = (w + PIX - 1) // PIX
        launch = _Launch(func, (n * strips * (-(-h // tile_rows)), groups // gpb),
                         gpb * tile_rows, _tile_bytes(gpb, tile_rows), 4,
                         (n, h, w, groups, strips, tile_rows), residual_slot=True)
    _conv_launches[key] = launch
    return launch


# The tensor-core conv (dwconv7.cu, TENSOR_CORES): tiles of _TC_TILE x _TC_TILE output
# pixels, a warp per 8 channels and up to _TC_MAX_WARPS warps a block. It is used for the
# forward conv (no residual) of images at least _TC_MIN_SIDE pixels a side with at least
# _TC_MIN_WAVES waves of (tile, channel block) pairs: there it was faster on an H100 (bf16,
# do_bench per conv, as tools/microbench_dwconv.py times it: 148 against 171 us at
# 128x96x56^2, 84 against 103 at 128x192x28^2, 51 against 58 at 128x384x14^2, 154 against
# 202 at 32x96x128^2), and slower where a 16x16 tile is mostly padding (61 against 38 us
# at 128x768x7^2) or the work is under two waves (43.5 against 41 at 2x192x100x167). It
# adds no residual: with one (the input gradient, 260 against 271 us at 32x96x128^2, 44
# against 35 at 2x384x50x84) it was on par at best.
# "auto": where it is the faster kernel (above); "always" where it applies at all, "never":
# for tests and measurements, which run both kernels.
TENSOR_CORES = "auto"
_TC_TILE = 16
_TC_MAX_WARPS = 4
_TC_MIN_SIDE = 12
_TC_MIN_WAVES = 2.5


def _uses_tensor_cores(c: int, aligned16: bool, device: torch.device,
                       residual_kind: int = 0) -> bool:
    if TENSOR_CORES not in ("auto", "always", "never"):
        raise ValueError("cuda_dwconv.TENSOR_CORES must be 'auto', 'always' or 'never', got "
                         f"{TENSOR_CORES!r}")
    if TENSOR_CORES == "never" or residual_kind:
        return False
    # mma.m16n8k16 in bf16/fp16 needs sm_80; a warp's 8 channels are one 16-byte load.
    return c % 8 == 0 and aligned16 and _capability_of(device)[0] >= 8


def _tc_smem_bytes(warps: int) -> int:
    # dwconv7.cu's TC_TILE_BYTES (each warp's 8 channel tiles of 22 rows of 48 bytes, and
    # 32 bytes of padding) and tap-pair tables (7 x 22 pairs of 4 bytes a channel).
    return warps * (8 * 22 * 48 + 32) + 8 * warps * 7 * 22 * 4


def _tc_pays(h: int, w: int, block_tiles: int, slots: int) -> bool:
    """Whether the tensor-core conv is the faster one for an h x w image with `block_tiles`
    (tile, channel block) pairs on a GPU with `slots` resident blocks (see above)."""
    return min(h, w) >= _TC_MIN_SIDE and block_tiles >= _TC_MIN_WAVES * slots


def _tc_plan(device: torch.device, elem_bf16: bool, out_fp32: bool, mirror: bool, n: int,
             c: int, h: int, w: int, force: bool = False) -> Optional[_Launch]:
    """The tensor-core conv's launch for one shape, or None where the shape is one the
    CUDA-core kernel runs faster (unless `force`): as many blocks as are resident at once
    (each walks tiles with a grid stride, building its tap table once), split over the
    channel blocks."""
    chunks = c // 8
    warps = max(d for d in range(1, _TC_MAX_WARPS + 1) if chunks % d == 0)
    smem = _tc_smem_bytes(warps)
    # Registers cap a block of 4 warps at 4 an SM (128 a thread), shared memory too.
    resident = min(_smem_per_sm(device) // (smem + 1024), 16 // warps)
    row_tiles, col_tiles = -(-h // _TC_TILE), -(-w // _TC_TILE)
    channel_blocks = chunks // warps
    tiles = n * row_tiles * col_tiles
    slots = resident * _sm_count(device)
    if not force and not _tc_pays(h, w, tiles * channel_blocks, slots):
        return None
    macros = dict(_macros(elem_bf16, out_fp32, 0, mirror, 2 * warps), TENSOR_CORES=1)
    func = _function(device, "dwconv7_nhwc_tc", macros, dynamic_smem=smem)
    grid_x = min(tiles, max(1, slots // channel_blocks))
    return _Launch(func, (grid_x, channel_blocks), 32 * warps, smem, 3,
                   (n, h, w, chunks, row_tiles, col_tiles))


# The weight-gradient kernel's tiles (dwconv7.cu, WGRAD): TILE_W output columns (a macro:
# the loop over them is unrolled) by up to _WG_MAX_ROWS rows, _WG_GROUPS channel groups a
# block; about _WG_BLOCKS_PER_SM blocks per SM, each summing a chunk of consecutive tiles.
_WG_TILE_WIDTHS = (32, 24, 16)
_WG_MAX_ROWS = 8  # dwconv7.cu's WG_MAX_ROWS
_WG_GROUPS = 4
_WG_BLOCKS_PER_SM = 4


def _wgrad_macros(elem_bf16: bool, groups_per_block: int, tile_w: int, copy16: bool = False
                  ) -> Dict[str, int]:
    return {"WGRAD": 1, "ELEM_BF16": int(elem_bf16), "GROUPS_PER_BLOCK": groups_per_block,
            "TILE_W": tile_w, "COPY16": int(copy16)}


def _wgrad_pad(n: int, groups_per_block: int) -> int:
    return n + ((groups_per_block - n) & 15)  # dwconv7.cu's WG_PAD


def _wgrad_smem_bytes(groups_per_block: int, tile_w: int, tile_rows: int) -> int:
    """dwconv7.cu's shared memory for the weight gradient: two (x, dy) tile buffers, reused
    for the block's final sums."""
    x_stride = _wgrad_pad((tile_w + 6) * groups_per_block, groups_per_block)
    dy_stride = _wgrad_pad(tile_w * groups_per_block, groups_per_block)
    buffers = 2 * ((tile_rows + 6) * x_stride + tile_rows * dy_stride) * 8
    sums = tile_rows * 7 * groups_per_block * 7 * _VEC * 4
    return max(buffers, sums)


def _wgrad_tile_width(width: int) -> int:
    # The width that loads the fewest x columns per row: its strips, each TILE_W + 6 wide
    # (the padded columns are summed as zeros; the 6 are the taps' reach). Ties: the widest.
    return min(_WG_TILE_WIDTHS, key=lambda t: (-(-width // t) * (t + 6), -t))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _smem_per_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor


_wgrad_plans: Dict[Tuple, _Launch] = {}  # (device, dtype, shape) -> _wgrad_plan's answer


def _wgrad_plan(device: torch.device, dtype: torch.dtype, n: int, c: int, h: int, w: int,
                aligned16: bool) -> _Launch:
    """A weight-gradient launch, worked out once per shape (eager steps are bound by the
    host's time per launch)."""
    groups = c // _VEC
    gpb = max(d for d in (_WG_GROUPS, 2, 1) if groups % d == 0)
    tile_w = _wgrad_tile_width(w)
    row_tiles = -(-h // _WG_MAX_ROWS)
    tile_rows = -(-h // row_tiles)
    strips = -(-w // tile_w)
    tiles = n * strips * row_tiles
    channel_blocks = groups // gpb
    wanted_chunks = max(1, _WG_BLOCKS_PER_SM * _sm_count(device) // channel_blocks)
    tiles_per_chunk = -(-tiles // min(tiles, wanted_chunks))
    chunks = -(-tiles // tiles_per_chunk)
    func = _function(device, "dwconv7_wgrad_nhwc",
                     _wgrad_macros(dtype == torch.bfloat16, gpb, tile_w,
                                   _copy16(gpb, aligned16)),
                     dynamic_smem=_wgrad_smem_bytes(gpb, tile_w, _WG_MAX_ROWS))
    return _Launch(func, (chunks, channel_blocks), gpb * 7 * tile_rows,
                   _wgrad_smem_bytes(gpb, tile_w, tile_rows), 3,
                   (n, h, w, groups, strips, tile_rows, tiles_per_chunk))


def wgrad_launch(device: torch.device, dtype: torch.dtype, n: int, c: int, h: int, w: int,
                 aligned16: bool) -> _Launch:
    """The launch of `depthwise_conv7_weight_grad` for (n, c, h, w) inputs of `dtype` on
    `device` (an indexed CUDA device), worked out once; called with the stream and the
    pointers of x, dy and the (grid[0], c, 49) fp32 partial sums. `aligned16`: x and dy
    are 16-byte aligned."""
    key = (device.index, dtype, n, c, h, w, aligned16)
    plan = _wgrad_plans.get(key)
    if plan is None:
        plan = _wgrad_plans[key] = _wgrad_plan(device, dtype, n, c, h, w, aligned16)
    return plan


def depthwise_conv7_weight_grad(x: Tensor, dy: Tensor) -> Tensor:
    """The weight gradient of ``F.conv2d(x, w, padding=3, groups=C)`` given its output
    gradient `dy`: (C, 1, 7, 7) fp32, summed in fp32 (chunk sums added in a fixed order, so
    the result does not depend on scheduling).

    x, dy: (N, C, H, W) of one half-precision dtype, both with `supports`."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return depthwise_conv7_weight_grad(x, dy)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError("dy must have x's shape and dtype, got "
                         f"{tuple(dy.shape)} {dy.dtype} for x {tuple(x.shape)} {x.dtype}")
    dy = dy.contiguous(memory_format=torch.channels_last)
    if dy.data_ptr() % 8:
        dy = dy.clone(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    plan = wgrad_launch(x.device, x.dtype, n, c, h, w,
                        x.data_ptr() % 16 == 0 and dy.data_ptr() % 16 == 0)
    chunks = plan.grid[0]
    partial = x.new_empty((chunks, c, 49), dtype=torch.float32)
    plan(torch._C._cuda_getCurrentRawStream(x.device.index), x.data_ptr(), dy.data_ptr(),
         partial.data_ptr())
    return (partial.sum(0) if chunks > 1 else partial[0]).view(c, 1, 7, 7)
