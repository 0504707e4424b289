#!/usr/bin/env python3
"""Side-by-side speed and memory of convnext_backbone against its peers.

Measures, in one process: this package (`ConvNextBackbone`, fast path on where it
applies), timm (`create_model(..., features_only=True)`), torchvision
(`convnext_*().features`, the four stage outputs collected) and transformers
(`ConvNextBackbone`, list-typed sizes), every model returning all four stage outputs.

Workloads (``--workloads``):
  train  forward + backward, batch 32 at 512x512 (segmentation-shaped)
  infer  forward only, batch 128 at 224x224
  det    forward + backward, batch 2 at 800x1333 (detection-shaped)
each in eager and torch.compile mode (``--modes``), and on GPU also as a captured CUDA
graph (``graph``: the eager model's whole step, forward + loss + backward, captured once
with `torch.cuda.graph` and replayed; the new input is copied into the graph's static
input each step, as a training loop would). On GPU: bf16 autocast and channels_last; on
CPU: fp32, and the default workload is inference at batch 1, 512x512.

Reports img/s (median of timed iterations after warm-up; CUDA events on GPU), peak
memory (total and above the step's starting allocation) and the ratio of this package
to every peer; prints a table and writes ``results.json`` and ``results.png`` into
``--out``. Before timing, this package's fast path is checked against its pure-PyTorch
reference path on the same input and weights (outputs, and gradients for training
workloads), and every graph-mode measurement checks its replayed outputs and gradients
against the same step run eagerly: a fast wrong answer cannot win.

Examples:
  PYTHONPATH=. python3 tools/benchmark.py --quick
  PYTHONPATH=. python3 tools/benchmark.py --device cuda --workloads train infer --modes eager compile
  PYTHONPATH=. python3 tools/benchmark.py --peers ours timm --modes eager compile graph
  PYTHONPATH=. python3 tools/benchmark.py --device cpu --peers ours timm --repeat 3
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PEERS = ("ours", "timm", "torchvision", "transformers")
MODES = ("eager", "compile", "graph")
# Modes that need CUDA (graph capture).
GPU_ONLY_MODES = ("graph",)
# The V1 sizes every peer has; shapes come from the package's one declaration.
BENCH_VARIANTS = ("tiny", "small", "base")
# name: (batch, height, width, backward?)
GPU_WORKLOADS = {
    "train": (32, 512, 512, True),
    "infer": (128, 224, 224, False),
    "det": (2, 800, 1333, True),
}
GPU_WORKLOADS_QUICK = {
    "train": (4, 256, 256, True),
    "infer": (16, 224, 224, False),
    "det": (1, 400, 672, True),
}
CPU_WORKLOADS = {
    "infer": (1, 512, 512, False),
    "train": (1, 256, 256, True),
    "det": (1, 800, 1333, True),
}
CPU_WORKLOADS_QUICK = {
    "infer": (1, 256, 256, False),
    "train": (1, 128, 128, True),
    "det": (1, 256, 416, True),
}


class PeerUnavailable(RuntimeError):
    """The peer's library is missing or cannot build the model here."""


class _StageCollector(nn.Module):
    """torchvision `features` returns only its last map: run it module by module and keep
    the outputs of `features.1/3/5/7` (the four stages)."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (1, 3, 5, 7):
                outs.append(x)
        return outs


class _FeatureList(nn.Module):
    """Normalises every peer's output to a list of the four stage maps."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.kind in ("ours", "transformers"):
            return list(self.model(x).feature_maps)
        return list(self.model(x))


def build_peer(name: str, variant: str) -> nn.Module:
    """Builds one peer's ConvNeXt backbone returning all four stage outputs.

    Args:
        name: one of PEERS.
        variant: 'tiny', 'small' or 'base'.
    """
    from convnext_backbone import VARIANTS

    spec = VARIANTS[variant]
    stages = ["stage1", "stage2", "stage3", "stage4"]
    try:
        if name == "ours":
            from convnext_backbone import ConvNextBackbone, ConvNextConfig

            cfg = ConvNextConfig.from_variant(variant, out_features=stages)
            return _FeatureList(ConvNextBackbone(cfg), "ours")
        if name == "timm":
            import timm

            return _FeatureList(timm.create_model(f"convnext_{variant}", pretrained=False,
                                                  features_only=True, out_indices=(0, 1, 2, 3)),
                                "timm")
        if name == "torchvision":
            import torchvision

            fn = getattr(torchvision.models, f"convnext_{variant}")
            return _FeatureList(_StageCollector(fn(weights=None).features), "torchvision")
        if name == "transformers":
            import transformers

            # List-typed sizes: transformers 5.x crashes on its own tuple defaults.
            cfg = transformers.ConvNextConfig(hidden_sizes=list(spec["hidden_sizes"]),
                                              depths=list(spec["depths"]), out_features=stages)
            return _FeatureList(transformers.ConvNextBackbone(cfg), "transformers")
    except ImportError as exc:
        raise PeerUnavailable(f"{name} is not installed ({exc})") from exc
    raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: Optional[torch.dtype], cache_enabled: bool = True):
    if dtype is None:
        return contextlib.nullcontext()
    # CUDA graphs need autocast's weight-cast cache off: a cached cast made outside the
    # capture would be read, never recomputed, by every replay.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def _loss(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    # Every stage output takes part, so no peer can skip work.
    return sum(f.float().mean() for f in feats)


def make_step(model: nn.Module, x: torch.Tensor, backward: bool, device: torch.device,
              amp_dtype: Optional[torch.dtype], autocast_cache: bool = True
              ) -> Callable[[], None]:
    """One timed unit: forward (+ backward and gradient release) on a fixed input."""
    if backward:
        def step() -> None:
            with _autocast(device, amp_dtype, autocast_cache):
                loss = _loss(model(x))
            loss.backward()
            for p in model.parameters():
                p.grad = None
    else:
        def step() -> None:
            with torch.inference_mode(), _autocast(device, amp_dtype, autocast_cache):
                model(x)
    return step


def _graph_context(peer: str, min_train_elements: int) -> Callable[[], Any]:
    """What this package's graphs are captured under: by default (0) every training block
    on the fused kernels. `ops.MIN_TRAIN_ELEMENTS` sends small training blocks to the
    reference path because eagerly their fused backward's launches cost more host time
    than they save on the GPU; a graph's replays cost no host time per kernel."""
    if peer != "ours":
        return contextlib.nullcontext
    from convnext_backbone import ops

    return lambda: ops.fast_path(ops.fast_path_enabled(), min_train_elements=min_train_elements)


def build_step(model: nn.Module, x: torch.Tensor, backward: bool, mode: str,
               device: torch.device, amp_dtype: Optional[torch.dtype], peer: str = "ours",
               graph_min_train_elements: int = 0) -> Tuple[Callable[[], None], float]:
    """The timed step of `mode` and its set-up seconds (compilation or capture);
    `graph_min_train_elements`: this package's small-training-block threshold in graph mode."""
    t0 = time.perf_counter()
    if mode == "graph":
        if device.type != "cuda":
            raise ValueError("mode 'graph' captures a CUDA graph: it needs --device cuda")
        context = _graph_context(peer, graph_min_train_elements)
        step: Callable[[], None] = GraphedStep(model, x, backward, amp_dtype,
                                               capture_context=context)
    else:
        fn = torch.compile(model, dynamic=False) if mode == "compile" else model
        step = make_step(fn, x, backward, device, amp_dtype)
        if mode == "compile":
            step()  # compiles
    _sync(device)
    return step, time.perf_counter() - t0


class GraphedStep:
    """The step of `make_step`, captured once into a CUDA graph and replayed.

    Warm-up steps run eagerly on a side stream first (compiling kernels, picking cuDNN
    algorithms, so that nothing is built during capture); then one step is captured with
    the gradients unset, so that every replay writes fresh gradients into the same
    buffers (`.grad` of each parameter), as PyTorch's whole-network capture does. Calling
    the object copies `x` into the graph's static input and replays.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, backward: bool,
                 amp_dtype: Optional[torch.dtype], warmup: int = 3,
                 capture_context: Callable[[], Any] = contextlib.nullcontext) -> None:
        device = x.device
        self.model, self.x, self.backward = model, x, backward
        self.capture_context = capture_context
        self.static_x = x.clone()
        eager = make_step(model, self.static_x, backward, device, amp_dtype,
                          autocast_cache=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # The same settings for warm-up and capture: a kernel first met during capture
        # would be compiled and loaded there, which capture forbids.
        with capture_context():
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    eager()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            if backward:
                for p in model.parameters():
                    p.grad = None
                with torch.cuda.graph(self.graph):
                    with _autocast(device, amp_dtype, cache_enabled=False):
                        self.outputs = model(self.static_x)
                    _loss(self.outputs).backward()
            else:
                with torch.cuda.graph(self.graph), torch.inference_mode(), \
                        _autocast(device, amp_dtype, cache_enabled=False):
                    self.outputs = model(self.static_x)

    def __call__(self) -> None:
        self.static_x.copy_(self.x)
        self.graph.replay()

    def check_against_eager(self, amp_dtype: Optional[torch.dtype]) -> float:
        """Replays once, runs the same step eagerly on the same input, and returns the worst
        relative difference over the outputs and (training) the parameter gradients."""
        self()
        torch.cuda.synchronize(self.x.device)
        got = [o.detach().float().clone() for o in self.outputs]
        got_grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                     if p.grad is not None}
        grad_ctx = contextlib.nullcontext() if self.backward else torch.inference_mode()
        saved_grads = {n: p.grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.grad = None
        with self.capture_context():  # the settings the graph was captured under
            with grad_ctx, _autocast(self.x.device, amp_dtype):
                want = self.model(self.x)
            errs = [_rel(a, b.detach().float()) for a, b in zip(got, want)]
            if self.backward:
                _loss(want).backward()
                errs += [_rel(got_grads[n], p.grad) for n, p in self.model.named_parameters()
                         if p.grad is not None and p.grad.norm() > 0]
        # The graph writes into its own gradient buffers: hand them back to the parameters.
        for n, p in self.model.named_parameters():
            p.grad = saved_grads[n]
        return max(errs)


def time_step(step: Callable[[], None], device: torch.device, warmup: int,
              iters: int) -> Tuple[List[float], int, int]:
    """Returns per-iteration seconds, peak bytes, and bytes allocated before the step.

    A CUDA graph's intermediate tensors live in its private memory pool, which stays
    reserved (not allocated) between replays: for a `GraphedStep` the peak is the peak of
    reserved memory, measured after every other cached block has been released."""
    for _ in range(warmup):
        step()
    _sync(device)
    times: List[float] = []
    base = peak = 0
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
        peak = (torch.cuda.max_memory_reserved(device) if isinstance(step, GraphedStep)
                else torch.cuda.max_memory_allocated(device))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times, peak, base


# --------------------------------------------------------------------------- checks
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_fast_path(variant: str, device: torch.device, amp_dtype: Optional[torch.dtype],
                    backward: bool, size: Tuple[int, int, int]) -> Dict[str, Any]:
    """Compares this package's fast path against its reference path (same weights, same
    input): worst relative error over the four outputs and, with `backward`, over the
    input and parameter gradients."""
    from convnext_backbone import ops

    torch.manual_seed(0)
    model = build_peer("ours", variant).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # Layer scale at 1e-6 would hide the blocks' contribution: use a scale that lets every
    # block change the output measurably.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.2, 0.6)
    b, h, w = size
    x = torch.randn(b, 3, h, w, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def run(fast: bool):
        # The check's input is small: let every training block take the fast path, too.
        with ops.fast_path(fast), mock.patch.object(ops, "MIN_TRAIN_ELEMENTS", 0):
            xi = x.clone().requires_grad_(backward)
            # Inference workloads are checked the way they are timed (no autograd), so
            # inference-only paths are covered too.
            grad_ctx = contextlib.nullcontext() if backward else torch.inference_mode()
            with grad_ctx, _autocast(device, amp_dtype):
                feats = model(xi)
            grads = {}
            if backward:
                # Random per-element weights: a plain mean of LayerNorm-ed maps has an almost
                # zero gradient, which would make relative errors meaningless.
                gen = torch.Generator(device=device).manual_seed(1)
                sum((f.float() * torch.randn(f.shape, device=device, generator=gen)).sum()
                    for f in feats).backward()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
                grads["input"] = xi.grad.detach().clone()
                for p in model.parameters():
                    p.grad = None
            return [f.detach().float() for f in feats], grads

    fast_feats, fast_grads = run(True)
    ref_feats, ref_grads = run(False)
    report: Dict[str, Any] = {
        # Triton kernels on GPU; on CPU, inference takes oneDNN's fused linear ops.
        "fast_path": ("triton" if ops.fast_path_available(x) else
                      "onednn" if (device.type == "cpu" and not backward
                                   and ops.cpu.mkldnn_linear_ok()) else "none"),
        "max_rel_err_outputs": max(_rel(a, r) for a, r in zip(fast_feats, ref_feats)),
    }
    if backward:
        errs = {n: _rel(fast_grads[n], ref_grads[n]) for n in ref_grads
                if ref_grads[n].norm() > 0}
        worst = max(errs, key=errs.get)
        report["max_rel_err_grads"] = errs[worst]
        report["worst_grad"] = worst
    tol = 1e-2 if amp_dtype is not None else 1e-4
    report["tolerance"] = tol
    report["ok"] = all(v <= tol for k, v in report.items() if k.startswith("max_rel_err"))
    return report


# --------------------------------------------------------------------------- driver
def run_one(peer: str, variant: str, workload: Tuple[int, int, int, bool], mode: str,
            device: torch.device, amp_dtype: Optional[torch.dtype], warmup: int,
            iters: int, channels_last: bool, graph_min_train_elements: int = 0) -> Dict[str, Any]:
    batch, h, w, backward = workload
    torch.manual_seed(0)
    model = build_peer(peer, variant).to(device)
    model.train(backward)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    step, setup_s = build_step(model, x, backward, mode, device, amp_dtype, peer,
                               graph_min_train_elements)
    times, peak, base = time_step(step, device, warmup, iters)
    med = statistics.median(times)
    out = {
        "peer": peer, "mode": mode, "batch": batch, "height": h, "width": w,
        "backward": backward, "median_s": med, "img_per_s": batch / med,
        "min_s": min(times), "iters": len(times), "compile_s": round(setup_s, 1),
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = peak / 1e9
        out["step_mem_gb"] = (peak - base) / 1e9
    if isinstance(step, GraphedStep):
        err = step.check_against_eager(amp_dtype)
        out["graph_vs_eager_rel_err"] = err
        tol = 1e-2 if amp_dtype is not None else 1e-4
        if not err <= tol:
            raise RuntimeError(f"the replayed graph differs from the eager step: relative "
                               f"error {err:.3g} > {tol:g}")
    del model, x, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def profile_one(peer: str, variant: str, workload: Tuple[int, int, int, bool], mode: str,
                device: torch.device, amp_dtype: Optional[torch.dtype], channels_last: bool,
                top: int = 22, graph_min_train_elements: int = 0) -> None:
    """Prints the kernels that take the most device time in a few steps."""
    from torch.profiler import ProfilerActivity, profile

    batch, h, w, backward = workload
    model = build_peer(peer, variant).to(device).train(backward)
    x = torch.randn(batch, 3, h, w, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step, _ = build_step(model, x, backward, mode, device, amp_dtype, peer,
                         graph_min_train_elements)
    for _ in range(3):
        step()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"--- profile {peer}/{mode}, 3 steps of {workload} ---")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def _fmt_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.rjust(widths[i]) if i > 1 else c.ljust(widths[i])
                               for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def summarise(results: List[Dict[str, Any]]) -> str:
    rows = [["workload", "peer/mode", "img/s", "ms/step", "peak GB", "step GB", "vs ours-best"]]
    by_wl: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        if "img_per_s" in r:
            by_wl.setdefault(r["workload"], []).append(r)
    ratio_lines = []
    for wl, rs in by_wl.items():
        ours = {r["mode"]: r for r in rs if r["peer"] == "ours"}
        best = max(ours.values(), key=lambda r: r["img_per_s"]) if ours else None
        for r in rs:
            rows.append([wl, f"{r['peer']}/{r['mode']}", f"{r['img_per_s']:.1f}",
                         f"{r['median_s'] * 1e3:.2f}",
                         f"{r.get('peak_mem_gb', float('nan')):.2f}",
                         f"{r.get('step_mem_gb', float('nan')):.2f}",
                         f"{best['img_per_s'] / r['img_per_s']:.2f}x" if best else "-"])
        for om, o in sorted(ours.items()):
            for r in rs:
                if r["peer"] == "ours":
                    continue
                mem = ""
                if "peak_mem_gb" in o and r.get("peak_mem_gb"):
                    mem = f", peak mem {o['peak_mem_gb'] / r['peak_mem_gb']:.2f}x"
                    if r.get("step_mem_gb", 0) > 1e-3:
                        mem += f", step mem {o['step_mem_gb'] / r['step_mem_gb']:.2f}x"
                ratio_lines.append(f"  {wl}: ours/{om} vs {r['peer']}/{r['mode']}: speed "
                                   f"{o['img_per_s'] / r['img_per_s']:.2f}x{mem}")
    return _fmt_table(rows) + "\n\nratios (this package / peer):\n" + "\n".join(ratio_lines)


def plot(results: List[Dict[str, Any]], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart"
    ok = [r for r in results if "img_per_s" in r]
    workloads = list(dict.fromkeys(r["workload"] for r in ok))
    if not workloads:
        return "no results to plot"
    labels = list(dict.fromkeys(f"{r['peer']}/{r['mode']}" for r in ok))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        vals = {f"{r['peer']}/{r['mode']}": r["img_per_s"] for r in ok if r["workload"] == wl}
        names = [n for n in labels if n in vals]
        colors = ["tab:red" if n.startswith("ours") else "tab:gray" for n in names]
        ax.bar(range(len(names)), [vals[n] for n in names], color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("img/s")
        ax.set_title(wl)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _dump(path: str, env: Dict[str, Any], table: Dict[str, Any], workloads: Sequence[str],
          checks: Dict[str, Any], notes: List[str], results: List[Dict[str, Any]]) -> None:
    # Written after every measurement so that a run cut off by a time limit keeps its numbers.
    payload = {"env": env, "workloads": {wl: table[wl] for wl in workloads},
               "checks": checks, "notes": notes, "results": results}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--variant", default="tiny", choices=BENCH_VARIANTS)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--workloads", nargs="+", default=None,
                   choices=sorted(GPU_WORKLOADS), help="default: all on GPU, infer on CPU")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="default: eager and compile on GPU, eager on CPU; graph (GPU only): "
                        "the eager step captured as a CUDA graph")
    p.add_argument("--quick", action="store_true", help="small batches and few iterations")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1,
                   help="repeat each measurement and keep the fastest (for shared CPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=None, help="override every workload's batch")
    p.add_argument("--no-check", action="store_true", help="skip the fast-path equality check")
    p.add_argument("--graph-min-train-elements", type=int, default=0,
                   help="this package's small-training-block threshold in graph mode "
                        "(default 0: every block fused; eager mode keeps ops.MIN_TRAIN_ELEMENTS)")
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "benchmark"))
    p.add_argument("--profile", nargs="*", default=None, metavar="PEER/MODE",
                   help="print the top CUDA kernels of these (e.g. ours/eager timm/compile) "
                        "on the first workload, after timing")
    p.add_argument("--skip", nargs="*", default=[], metavar="PEER/WORKLOAD",
                   help="measurements to leave out, e.g. timm/train (with --merge: reuse them)")
    p.add_argument("--merge", nargs="*", default=[],
                   help="results.json files of earlier runs (same device) to include in the table")
    args = p.parse_args(argv)
    if args.graph_min_train_elements < 0:
        p.error(f"--graph-min-train-elements must be >= 0, got {args.graph_min_train_elements}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    table = (GPU_WORKLOADS_QUICK if args.quick else GPU_WORKLOADS) if gpu else \
        (CPU_WORKLOADS_QUICK if args.quick else CPU_WORKLOADS)
    workloads = args.workloads or (list(GPU_WORKLOADS) if gpu else ["infer"])
    modes = args.modes or (["eager", "compile"] if gpu else ["eager"])
    if not gpu and set(modes) & set(GPU_ONLY_MODES):
        p.error(f"modes {', '.join(GPU_ONLY_MODES)} need --device cuda")
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else (5 if gpu else 2))
    iters = args.iters if args.iters is not None else (5 if args.quick else (20 if gpu else 10))
    amp_dtype = torch.bfloat16 if gpu else None
    if gpu:
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)

    env = {
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "variant": args.variant,
        "precision": "bf16 autocast, channels_last" if gpu else "fp32",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    for mod in ("timm", "torchvision", "transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - any import failure only means "absent"
            env[mod] = None
    print("environment:", json.dumps(env), flush=True)

    results: List[Dict[str, Any]] = []
    json_path = os.path.join(args.out, "results.json")
    notes: List[str] = []
    checks: Dict[str, Any] = {}
    available = []
    for peer in args.peers:
        try:
            build_peer(peer, args.variant)
            available.append(peer)
        except PeerUnavailable as exc:
            notes.append(f"skipped {peer}: {exc}")
            print(f"NOTE: skipped {peer}: {exc}", flush=True)

    if "ours" in available and not args.no_check:
        for wl in workloads:
            b, h, w, backward = table[wl]
            size = (min(b, 2), min(h, 256), min(w, 320))
            try:
                checks[wl] = check_fast_path(args.variant, device, amp_dtype, backward, size)
            except Exception as exc:  # noqa: BLE001 - report, then refuse to time
                checks[wl] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            print(f"check fast path vs reference [{wl}, input {size}]: {checks[wl]}", flush=True)
        if not all(c.get("ok") for c in checks.values()):
            notes.append("fast-path check FAILED: this package's numbers are not trusted")
            print("ERROR: fast path disagrees with the reference path; timing the reference "
                  "path for this package instead", flush=True)
            os.environ["CONVNEXT_FAST_PATH"] = "0"
            from convnext_backbone import ops

            ops.refresh_from_env()  # read at import: the check has imported it already

    for wl in workloads:
        wl_spec = table[wl]
        if args.batch:
            wl_spec = (args.batch,) + tuple(wl_spec[1:])
        for mode in modes:
            # Repeats interleave the peers, so that a burst of load on a shared machine
            # does not hit one peer's repeats only; the fastest repeat is kept.
            bests: Dict[str, Dict[str, Any]] = {}
            for _rep in range(max(1, args.repeat)):
                for peer in available:
                    if f"{peer}/{wl}" in args.skip or "error" in bests.get(peer, {}):
                        continue
                    try:
                        r = run_one(peer, args.variant, wl_spec, mode, device, amp_dtype,
                                    warmup, iters, channels_last=gpu,
                                    graph_min_train_elements=args.graph_min_train_elements)
                    except Exception as exc:  # noqa: BLE001 - one failure must not end the run
                        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                        r = {"peer": peer, "mode": mode, "error": msg}
                        if gpu:
                            torch.cuda.empty_cache()
                    best = bests.get(peer)
                    if best is None or r.get("img_per_s", 0) > best.get("img_per_s", 0):
                        bests[peer] = r
            for peer, best in bests.items():
                best["workload"] = wl
                results.append(best)
                _dump(json_path, env, table, workloads, checks, notes, results)
                if "error" in best:
                    print(f"[{wl} {mode} {peer}] FAILED: {best['error']}", flush=True)
                else:
                    print(f"[{wl} {mode} {peer}] {best['img_per_s']:.1f} img/s, "
                          f"{best['median_s'] * 1e3:.2f} ms"
                          + (f", peak {best['peak_mem_gb']:.2f} GB" if gpu else "")
                          + (f", compile {best['compile_s']}s" if mode == "compile" else "")
                          + (f", graph vs eager {best['graph_vs_eager_rel_err']:.1e}"
                             if mode == "graph" else ""),
                          flush=True)

    _dump(json_path, env, table, workloads, checks, notes, results)
    for spec in args.profile or []:
        peer, _, mode = spec.partition("/")
        try:
            profile_one(peer, args.variant, table[workloads[0]], mode or "eager", device,
                        amp_dtype, gpu, graph_min_train_elements=args.graph_min_train_elements)
        except Exception as exc:  # noqa: BLE001 - profiling is optional
            print(f"profile {spec} failed: {exc}")
    merged = list(results)
    for path in args.merge:
        with open(path) as f:
            old = json.load(f)
        if old["env"].get("device") != env["device"]:
            notes.append(f"not merged {path}: measured on {old['env'].get('device')}")
            continue
        have = {(r["workload"], r["peer"], r["mode"]) for r in results}
        merged += [r for r in old["results"] if (r.get("workload"), r.get("peer"), r.get("mode"))
                   not in have]
        notes.append(f"merged results of {path} ({old['env'].get('command')})")
    results = merged
    summary = summarise(results)
    err = plot(results, os.path.join(args.out, "results.png"),
               f"ConvNeXt-{args.variant} backbone, {env['device']}, {env['precision']}")
    if err:
        notes.append(err)
    print(f"\n=== {env['device']} | ConvNeXt-{args.variant} | {env['precision']} | "
          f"torch {env['torch']} ===")
    for wl in workloads:
        b, h, w, bw = table[wl]
        print(f"  {wl}: batch {args.batch or b} at {h}x{w}, {'fwd+bwd' if bw else 'fwd'}")
    print(summary)
    for n in notes:
        print("NOTE:", n)
    print(f"wrote {json_path}")
    return 0 if all(c.get("ok", False) for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
