#!/usr/bin/env python
"""The project's main job on its embedded default, CPU only, a few minutes in all.

1. Backbone: makes an ImageNet-style ConvNeXt-T checkpoint (official `{'model': ...}`
   layout, random weights), loads it into a multi-scale backbone, prints output shapes,
   strides, parameter count and what the checkpoint did not provide.
2. Segmentation: tools/demo_segmentation.py (tiny ADE20K-format dataset, UperNet).
3. Detection: tools/demo_detection.py (tiny COCO-format dataset, Mask R-CNN).
Usage: python tools/demo.py [--out-dir outputs/demo] [--only backbone|segmentation|detection]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def backbone_demo(out_dir: str) -> None:
    import torch

    from convnext_backbone import ConvNextBackbone, ConvNextConfig, ConvNextForImageClassification
    from convnext_backbone.checkpoints import convert_state_dict

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    classifier = ConvNextForImageClassification(ConvNextConfig.from_variant("tiny", num_labels=1000))
    official = convert_state_dict(classifier.state_dict(), "official")
    path = os.path.join(out_dir, "convnext_tiny_1k_official.pth")
    torch.save({"model": official}, path)
    print(f"[backbone] wrote an official-format ImageNet checkpoint: {path}")

    backbone = ConvNextBackbone.from_pretrained(
        path, out_features=["stage1", "stage2", "stage3", "stage4"], strict=False).eval()
    report = backbone.load_report
    print(f"[backbone] detected format: {report.source_format}; not in the checkpoint "
          f"(per-stage out norms, left at their LayerNorm init and reported): {report.missing_keys}; "
          f"ignored (classifier parts): {report.ignored_keys}")
    with torch.no_grad():
        ref = classifier.convnext(torch.zeros(1, 3, 64, 64), output_hidden_states=True)
        out = backbone(torch.zeros(1, 3, 64, 64), output_hidden_states=True)
    same = all(torch.equal(a, b) for a, b in zip(ref.hidden_states, out.hidden_states))
    print(f"[backbone] stage outputs identical to the classifier's trunk: {same}")
    x = torch.randn(2, 3, 512, 683)
    with torch.no_grad():
        maps = backbone(x).feature_maps
    print(f"[backbone] input {tuple(x.shape)} (any size: padded to stride 32, outputs cropped)")
    print(f"{'stage':8} {'channels':>8} {'stride':>6}  shape")
    for name, fmap in zip(backbone.out_features, maps):
        spec = backbone.output_shape()[name]
        print(f"{name:8} {spec.channels:8d} {spec.stride:6d}  {tuple(fmap.shape)}")
    print(f"[backbone] parameters: {backbone.num_parameters():,} "
          f"(classifier with head: {classifier.num_parameters():,})")
    if not same:
        raise SystemExit("backbone outputs differ from the checkpoint's model")


def run_tool(script: str, out_dir: str) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "tools", script), "--out-dir", out_dir]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "outputs", "demo"))
    parser.add_argument("--only", choices=["backbone", "segmentation", "detection"])
    args = parser.parse_args()
    start = time.time()
    if args.only in (None, "backbone"):
        backbone_demo(os.path.join(args.out_dir, "backbone"))
    if args.only in (None, "segmentation"):
        run_tool("demo_segmentation.py", os.path.join(args.out_dir, "segmentation"))
    if args.only in (None, "detection"):
        run_tool("demo_detection.py", os.path.join(args.out_dir, "detection"))
    print(f"\n[demo] done in {time.time() - start:.0f} s; outputs in {args.out_dir}")


if __name__ == "__main__":
    main()
