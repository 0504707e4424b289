"""`convnext-convert SRC DST --to FORMAT [--from FORMAT]`: converts a ConvNeXt checkpoint
between the official, mmpretrain, transformers, timm and torchvision layouts."""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

from . import checkpoints as ckpt
from .configuration import ConvNextConfig

__all__ = ["convert_main", "build_parser"]

# How a torch file of each format is usually wrapped (what that project's loader expects).
_TORCH_WRAP = {"official": "model", "mmpretrain": "state_dict"}
_TRANSFORMERS_ARCH = {"head": "ForImageClassification", "backbone": "Backbone", "model": "Model"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convnext-convert",
        description="Convert a ConvNeXt (V1/V2) checkpoint between formats. Loads only "
                    "safetensors or weights-only pickles.")
    parser.add_argument("src", help="source checkpoint file (.safetensors, .pth, .pt, .bin) or a "
                                    "save_pretrained/transformers directory")
    parser.add_argument("dst", help="output: .safetensors, or .pth/.pt/.bin (torch.save); with "
                                    "--to transformers a path without extension is written as a "
                                    "directory with config.json + model.safetensors")
    parser.add_argument("--to", dest="dst_format", required=True, choices=ckpt.FORMATS)
    parser.add_argument("--from", dest="src_format", default=None, choices=ckpt.FORMATS,
                        help="source format (detected when omitted)")
    parser.add_argument("--drop-unsupported", action="store_true",
                        help="leave out tensors the target format has no place for (e.g. "
                             "per-stage out norms in timm/torchvision) instead of failing")
    parser.add_argument("--pointwise-as-conv", action="store_true",
                        help="write MLP weights as 1x1 convs (timm conv_mlp models such as "
                             "convnextv2_atto)")
    parser.add_argument("--prefix", default=None,
                        help="model prefix to write, e.g. 'backbone.' for an official det/seg "
                             "layout (default per format: see checkpoints.from_canonical)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _progress_bar(total: int, desc: str, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is not worth failing for
        return None
    return tqdm(total=total, desc=desc, unit="tensor", disable=disable, file=sys.stderr)


def convert_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `convnext-convert` and `tools/convert_checkpoint.py`.

    Args:
        argv: command-line arguments (default `sys.argv[1:]`).

    Returns:
        0 on success (errors raise `SystemExit` with a message).
    """
    args = build_parser().parse_args(argv)
    src = args.src
    stored_config = None
    try:
        if os.path.isdir(src):
            if os.path.isfile(os.path.join(src, "config.json")):
                # labels, eps and out_features live only there
                stored_config = ConvNextConfig.from_pretrained(src)
            src = ckpt._find_weights(src)
        state_dict = ckpt.load_checkpoint(src)
        bar = _progress_bar(len(state_dict), "converting", args.no_progress)
        update = bar.update if bar is not None else None
        canonical, report = ckpt.to_canonical(state_dict, args.src_format, progress=update)
        if bar is not None:  # now the number of tensors to write is known
            bar.total = len(state_dict) + len(canonical)
            bar.refresh()
        out = ckpt.from_canonical(canonical, args.dst_format, drop_unsupported=args.drop_unsupported,
                                  pointwise_as_conv=args.pointwise_as_conv, prefix=args.prefix,
                                  progress=update)
        if bar is not None:
            bar.close()
        try:
            config = stored_config or ckpt.infer_config(canonical)
        except ValueError as e:  # e.g. a partial checkpoint: still convertible
            config = None
            config_note = f"not inferred ({e})"
        else:
            kind = "V2 (GRN)" if config.use_grn else "V1"
            config_note = (f"{kind}, depths={config.depths}, hidden_sizes={config.hidden_sizes}, "
                           f"layer_scale={'yes' if config.layer_scale_init_value > 0 else 'no'}, "
                           f"head={'%d labels' % config.num_labels if 'head.weight' in canonical else 'none'}, "
                           f"out norms={config.out_features if _has_out_norms(canonical) else 'none'}")
        dst = _write(out, canonical, config, args.dst, args.dst_format, args.prefix)
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        raise SystemExit(f"convnext-convert: error: {e}")

    print(f"source:      {args.src}")
    print(f"detected:    {report.src_format}" + (f" (prefix {report.prefix!r})" if report.prefix else ""))
    print(f"mapped:      {len(report.mapped)} tensors -> {len(out)} {args.dst_format} tensors")
    print(f"ignored:     {len(report.ignored)}" +
          (f" ({', '.join(ckpt._abbreviate(report.ignored))})" if report.ignored else ""))
    print(f"unrecognised:{len(report.unrecognised):>2}" +
          (f" ({', '.join(report.unrecognised[:10])})" if report.unrecognised else ""))
    dropped = len(canonical) - len(out)
    if dropped:
        print(f"dropped:     {dropped} (no place in {args.dst_format})")
    print(f"config:      {config_note}")
    print(f"written:     {dst}")
    return 0


def _has_out_norms(canonical) -> bool:
    return any(re.match(r"^norm(\d+|_stem)\.", k) for k in canonical)


def _write(out, canonical, config, dst: str, dst_format: str, prefix: Optional[str]) -> str:
    ext = os.path.splitext(dst)[1].lower()
    if dst_format == "transformers" and ext == "" and config is not None:
        # A directory transformers' from_pretrained reads.
        has_head = any(k.startswith("head.") for k in canonical)
        has_out_norms = _has_out_norms(canonical)
        kind = "head" if has_head else "backbone" if has_out_norms else "model"
        config.extra["architectures"] = [
            ("ConvNextV2" if config.use_grn else "ConvNext") + _TRANSFORMERS_ARCH[kind]]
        os.makedirs(dst, exist_ok=True)
        ckpt.save_state_dict(out, os.path.join(dst, "model.safetensors"))
        config.save_pretrained(dst)
        return dst
    if ext not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(f"Unknown output extension {ext!r} for {dst!r}; use .safetensors, .pth, "
                         f".pt, .bin or .ckpt (or a directory path without extension with "
                         f"--to transformers)")
    # mmengine-style det/seg checkpoints keep `backbone.*` under 'state_dict'.
    wrap = "state_dict" if prefix == "backbone." else _TORCH_WRAP.get(dst_format)
    ckpt.save_state_dict(out, dst, wrap=None if ext == ".safetensors" else wrap)
    return dst


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_main())
