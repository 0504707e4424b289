#!/usr/bin/env python
"""Convert a ConvNeXt checkpoint between formats.

    python tools/convert_checkpoint.py SRC DST --to {official,mmpretrain,transformers,timm,torchvision} [--from FORMAT]

Same as the `convnext-convert` console script; see `convnext_backbone/cli.py`.
"""
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convnext_backbone.cli import convert_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_main())
