#!/usr/bin/env python
"""Parameters and FLOPs of the model in a config (mmengine's complexity analysis).

FLOPs are counted as in the paper and mmseg's get_flops: one fused multiply-add = one
FLOP, for the backbone + decode head at the given input size (the auxiliary head is a
training-only branch; its parameters are in the total but not in the FLOPs).

Usage:
    python tools/analyze.py CONFIG [--shape H W] [--no-flops] [--cfg-options ...]

Example (the paper reports 60M params, 939 GFLOPs at 2048x512 for UperNet + ConvNeXt-T):
    python tools/analyze.py configs/convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py --shape 512 2048
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
from typing import Any, Dict, Optional, Sequence

_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402


def build_model(config: str, cfg_options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Builds `cfg.model` in the config's default scope, without reading pretrained files."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, MODELS

    from convnext_backbone.mmengine_utils import skip_pretrained_files

    cfg = Config.fromfile(config)  # imports cfg.custom_imports
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    skip_pretrained_files(cfg)
    scope = cfg.get("default_scope", None)
    name = f"analyze-{id(cfg)}"
    if scope is not None and not DefaultScope.check_instance_created(name):
        DefaultScope.get_instance(name, scope_name=scope)
    with MODELS.switch_scope_and_registry(scope) as registry:
        model = registry.build(cfg.model)
    return model


class _DenseForward(nn.Module):
    """Image -> logits through the backbone and decode head (what the FLOPs count)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        model = self.model
        if hasattr(model, "extract_feat") and hasattr(model, "decode_head"):
            return model.decode_head(model.extract_feat(x))
        return model(x)


def analyze(config: str, shape: Sequence[int] = (512, 512), flops: bool = True,
            cfg_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Returns {'params', 'params_backbone', 'flops', 'shape'} of the config's model.

    Args:
        config: config path.
        shape: input (height, width).
        flops: also count FLOPs (runs one forward pass).
        cfg_options: config overrides.
    """
    model = build_model(config, cfg_options).eval()
    out: Dict[str, Any] = {
        "config": config,
        "shape": [int(shape[0]), int(shape[1])],
        "params": sum(p.numel() for p in model.parameters()),
    }
    if hasattr(model, "backbone"):
        out["params_backbone"] = sum(p.numel() for p in model.backbone.parameters())
    for head in ("decode_head", "auxiliary_head"):
        if isinstance(getattr(model, head, None), nn.Module):
            out[f"params_{head}"] = sum(p.numel() for p in getattr(model, head).parameters())
    if flops:
        from mmengine.analysis import FlopAnalyzer

        x = torch.randn(1, 3, int(shape[0]), int(shape[1]))
        with torch.no_grad():
            analyzer = FlopAnalyzer(_DenseForward(model), (x,))
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            out["flops"] = int(analyzer.total())
    return out


def main(argv=None) -> Dict[str, Any]:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description="Parameters and FLOPs of a config's model")
    parser.add_argument("config")
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="input height and width (default 512 512)")
    parser.add_argument("--no-flops", action="store_true", help="count parameters only")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    args = parser.parse_args(argv)
    result = analyze(args.config, args.shape, not args.no_flops, args.cfg_options)
    if args.json:
        print(json.dumps(result))
        return result
    print(f"config:     {result['config']}")
    print(f"input:      1x3x{result['shape'][0]}x{result['shape'][1]}")
    print(f"params:     {result['params']:,} ({result['params'] / 1e6:.1f}M)")
    for key in ("params_backbone", "params_decode_head", "params_auxiliary_head"):
        if key in result:
            print(f"  {key[len('params_'):]:<15} {result[key]:,}")
    if "flops" in result:
        print(f"FLOPs:      {result['flops'] / 1e9:.1f}G (multiply-adds, backbone + decode head)")
    return result


if __name__ == "__main__":
    main()
