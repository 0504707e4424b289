"""Per-kernel timings of the fast path against cuDNN / aten (run on a GPU):
``PYTHONPATH=. python tools/microbench_kernels.py``. Prints milliseconds (median, do_bench)."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F


def main() -> None:
    import triton

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from convnext_backbone.ops import _kernels

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    dt = torch.bfloat16
    # cudnn dgrad: cuDNN's input-gradient kernel; flip fwd: the same gradient as a forward
    # conv with mirrored taps (what the fast path runs); cudnn wgrad: weight gradient only.
    print(f"{'shape (N,C,H,W)':>22} {'tri fwd+ln':>10} {'cudnn+ln':>9} {'tri dgrad':>9} "
          f"{'cudnn dgrad':>11} {'flip fwd':>8} {'tri wgrad':>9} {'cudnn wgrad':>11} "
          f"{'ln_bwd':>7} {'copy MB/ms':>10}")
    for n, c, h, w in [(32, 96, 128, 128), (32, 192, 64, 64), (32, 384, 32, 32), (32, 768, 16, 16),
                       (128, 96, 56, 56), (128, 384, 14, 14)]:
        p = n * h * w
        x32 = torch.randn(p, c, device="cuda")
        xb = x32.to(dt)
        wconv = torch.randn(c, 1, 7, 7, device="cuda") * 0.1
        taps = wconv.reshape(c, 49).t().contiguous()
        bias = torch.randn(c, device="cuda")
        lnw, lnb = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
        t_fwd = bench(lambda: _kernels.dwconv7(x32, taps, bias, n, h, w, c, dt, ln=(lnw, lnb, 1e-6)))
        x4 = xb.view(n, h, w, c).permute(0, 3, 1, 2)
        wb, bb = wconv.to(dt), bias.to(dt)

        def cudnn_fwd():
            y = F.conv2d(x4, wb, bb, padding=3, groups=c)
            torch.native_layer_norm(y.permute(0, 2, 3, 1).reshape(p, c), [c], lnw.to(dt), lnb.to(dt), 1e-6)

        t_cf = bench(cudnn_fwd)
        dy = torch.randn(p, c, device="cuda", dtype=dt)
        t_dg = bench(lambda: _kernels.dwconv7(dy, taps, None, n, h, w, c, torch.float32, flip=True, residual=x32))
        t_wg = bench(lambda: _kernels.dwconv7_wgrad(dy, x32, n, h, w, c))
        dy4 = dy.view(n, h, w, c).permute(0, 3, 1, 2)
        conv_bwd = torch.ops.aten.convolution_backward
        t_cdg = bench(lambda: conv_bwd(dy4, x4, wb, [c], [1, 1], [3, 3], [1, 1], False, [0, 0],
                                       c, [True, False, False]))
        wflip = wb.flip(2, 3)
        t_flip = bench(lambda: F.conv2d(dy4, wflip, None, padding=3, groups=c))
        t_cwg = bench(lambda: conv_bwd(dy4, x4, wb, [c], [1, 1], [3, 3], [1, 1], False, [0, 0],
                                       c, [False, True, False]))
        mean = torch.randn(p, device="cuda")
        rstd = torch.rand(p, device="cuda") + 0.5
        t_ln = bench(lambda: _kernels.ln_bwd(xb, dy, mean, rstd, lnw, lnb, dt))
        t_cp = bench(lambda: x32.clone())
        print(f"{str((n, c, h, w)):>22} {t_fwd:10.3f} {t_cf:9.3f} {t_dg:9.3f} {t_cdg:11.3f} "
              f"{t_flip:8.3f} {t_wg:9.3f} {t_cwg:11.3f} {t_ln:7.3f} "
              f"{2 * x32.numel() * 4 / 1e6 / t_cp:10.0f}")


if __name__ == "__main__":
    main()
