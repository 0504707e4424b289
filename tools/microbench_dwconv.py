"""Times the depthwise 7x7 conv kernels of `convnext_backbone.ops.cuda_dwconv` against each
other and cuDNN at ConvNeXt-T's stage shapes (run on a GPU):

    PYTHONPATH=. python tools/microbench_dwconv.py [--dtype bf16|fp16]

Columns, per shape (N, C, H, W), in microseconds (do_bench medians):
  cuda-cores     the CUDA-core kernel (`TENSOR_CORES = "never"`)
  tensor-cores   the tensor-core kernel (`"always"`; only where C is a multiple of 8)
  auto           the kernel the fast path runs (`"auto"`: `_tc_pays` picks)
  cudnn          aten's conv2d (cuDNN) on the same channels_last input
  dgrad          the input gradient as the block runs it (CUDA-core kernel, mirrored taps,
                 the fp32 residual gradient added, fp32 out)
Each kernel's output is checked against an fp32 conv of the same rounded inputs before it
is timed (within one rounding to the input's dtype)."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (label, (N, C, H, W), blocks of that shape in ConvNeXt-T): inference 128x224^2, training
# 32x512^2 and detection 2x800x1333 (whose stages 3-4 train on the reference path in eager
# mode, `ops.MIN_TRAIN_ELEMENTS`, but take the fused kernels in graph mode and inference).
SHAPES = [("infer s1", (128, 96, 56, 56), 3), ("infer s2", (128, 192, 28, 28), 3),
          ("infer s3", (128, 384, 14, 14), 9), ("infer s4", (128, 768, 7, 7), 3),
          ("train s1", (32, 96, 128, 128), 3), ("train s2", (32, 192, 64, 64), 3),
          ("train s3", (32, 384, 32, 32), 9),
          ("train s4", (32, 768, 16, 16), 3), ("det s1", (2, 96, 200, 334), 3),
          ("det s2", (2, 192, 100, 167), 3), ("det s3", (2, 384, 50, 84), 9),
          ("det s4", (2, 768, 25, 42), 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("microbench_dwconv.py needs a CUDA GPU")
    import triton

    from convnext_backbone.ops import cuda_dwconv

    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    modes = ("never", "always", "auto")
    print(f"{'shape':>9} {'(N, C, H, W)':>20} {'cuda-cores':>10} {'tensor-cores':>12} "
          f"{'auto':>6} {'cudnn':>6} {'dgrad':>6}   (us)")
    totals = {}
    for label, shape, blocks in SHAPES:
        torch.manual_seed(0)
        n, c, h, w = shape
        x = torch.randn(shape, device="cuda").to(dt).contiguous(memory_format=torch.channels_last)
        taps = torch.randn(c, 1, 7, 7, device="cuda") * 0.2
        ref = F.conv2d(x.float(), taps.to(dt).float(), padding=3, groups=c)
        residual = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
        times = {}
        for mode in modes:
            cuda_dwconv.TENSOR_CORES = mode
            aligned = x.data_ptr() % 16 == 0
            if mode == "always" and not cuda_dwconv._uses_tensor_cores(c, aligned, x.device):
                times[mode] = float("nan")
                continue
            y = cuda_dwconv.depthwise_conv7(x, taps).float()
            assert ((y - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all(), (label, mode)
            times[mode] = bench(lambda: cuda_dwconv.depthwise_conv7(x, taps)) * 1e3
        cuda_dwconv.TENSOR_CORES = "auto"
        taps_c = taps.to(dt)
        times["cudnn"] = bench(lambda: F.conv2d(x, taps_c, padding=3, groups=c)) * 1e3
        times["dgrad"] = bench(lambda: cuda_dwconv.depthwise_conv7(
            x, taps, mirror=True, residual=residual, out_dtype=torch.float32)) * 1e3
        print(f"{label:>9} {str(shape):>20} {times['never']:10.1f} {times['always']:12.1f} "
              f"{times['auto']:6.1f} {times['cudnn']:6.1f} {times['dgrad']:6.1f}")
        step = label.split()[0]
        for key, t in times.items():
            totals[step, key] = totals.get((step, key), 0.0) + blocks * t
    print("per step, ConvNeXt-T's blocks (ms):")
    for step in ("infer", "train", "det"):
        print(f"  {step}: " + ", ".join(f"{key} {totals[step, key] / 1e3:.3f}"
                                        for key in ("never", "always", "auto", "cudnn", "dgrad")))


if __name__ == "__main__":
    main()
