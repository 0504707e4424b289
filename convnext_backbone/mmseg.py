"""mmsegmentation integration: the core `ConvNextBackbone` registered as mmseg's `ConvNeXt`.

Importing this module (or `custom_imports=dict(imports=['convnext_backbone.mmseg'],
allow_failed_imports=False)` in a config) registers:

- `ConvNeXt` in mmseg's `MODELS`: the core backbone with the mmseg/official argument
  convention. Parameter names are the official layout (`downsample_layers.{i}`,
  `stages.{i}.{j}`, `norm{i}`), so official segmentation checkpoints load as they are and
  mmseg's own `LearningRateDecayOptimizerConstructor` (which looks for `ConvNeXt` in the
  backbone's class name and for those names) assigns the right learning rates.
- `ConvNextLayerDecayOptimizerConstructor` (see `convnext_backbone.lr_decay`).
- safe resume on torch >= 2.6 and atomic checkpoint writes (see
  `convnext_backbone.mmengine_utils`).

Example config:
    custom_imports = dict(imports=['convnext_backbone.mmseg'], allow_failed_imports=False)
    model = dict(backbone=dict(type='ConvNeXt', arch='tiny', out_indices=(0, 1, 2, 3),
                               drop_path_rate=0.3, layer_scale_init_value=1.0,
                               init_cfg=dict(type='Pretrained', checkpoint='convnext_tiny_1k_224.pth')))
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

try:
    from mmengine.logging import print_log
    from mmseg.registry import MODELS
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "convnext_backbone.mmseg needs mmsegmentation 1.x with mmcv 2.x (compiled ops) and "
        "mmengine: pip install 'convnext-backbone[mmseg]' (mmcv 2.1.0 must be built from source "
        f"on torch >= 2.4, see tools/setup_env.sh). Original error: {err}") from err

from .configuration import VARIANTS, ConvNextConfig, variant_key
from .lr_decay import param_groups_lr_decay  # noqa: F401  (registers the optim constructor)
from .mmengine_utils import setup_mmengine
from .modeling import ConvNextBackbone
from .stage_selection import normalize_indices

__all__ = ["ConvNeXt"]

setup_mmengine()

_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _arch_args(arch: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Depths/widths (and V2 switches) from a variant name or an mmpretrain-style dict."""
    if isinstance(arch, str):
        try:
            key = variant_key(arch)
        except ValueError:
            raise ValueError(f"Unknown ConvNeXt arch {arch!r}; valid names: {list(VARIANTS)}, "
                             f"or a dict(depths=[...], channels=[...])") from None
        return copy.deepcopy(VARIANTS[key])
    if isinstance(arch, dict):
        depths = arch.get("depths")
        channels = arch.get("channels", arch.get("dims", arch.get("hidden_sizes")))
        if depths is None or channels is None:
            raise ValueError(f"arch dict needs 'depths' and 'channels' (or 'dims'), got keys "
                             f"{sorted(arch)}")
        return {"depths": list(depths), "hidden_sizes": list(channels)}
    raise ValueError(f"arch must be a variant name ({list(VARIANTS)}) or a dict with depths and "
                     f"channels, got {arch!r}")


@MODELS.register_module()
class ConvNeXt(ConvNextBackbone):
    """ConvNeXt V1/V2 backbone for mmsegmentation (the core backbone, adapted).

    Args:
        arch: a variant name ('tiny', 'small', 'base', 'large', 'xlarge', 'v2-atto' ...
            'v2-huge'; mmpretrain's 'atto'/'femto'/'pico'/'nano'/'huge' mean the V2 sizes) or a
            dict with `depths` and `channels` (or `dims`).
        in_channels: input channels.
        out_indices: stages to return, **0 = first stage** (as in the official and mmpretrain
            backbones); negative indices count from the last stage. Must be unique and in
            stage order. Ignored when `out_features` is given.
        out_features: alternatively, stage names ("stem", "stage1" ... "stage4").
        drop_path_rate: stochastic-depth rate (linearly increasing over blocks).
        layer_scale_init_value: initial layer scale (0 disables); default: the variant's
            (1e-6 for V1, off for V2). The official seg configs use 1.0, which is overwritten
            by pretrained weights anyway.
        use_grn: ConvNeXt V2's GRN; default: the variant's.
        frozen_stages: -1 or 0: nothing frozen; k: the stem and the first k stages frozen.
        with_cp: gradient checkpointing of every block (saves memory, same gradients).
        gap_before_final_norm: accepted for mmpretrain configs; only False is meaningful for
            dense prediction.
        init_cfg: `dict(type='Pretrained', checkpoint=PATH, prefix=None)`: a checkpoint in any
            format `convnext_backbone.checkpoints` reads (official, timm, transformers,
            torchvision, mmpretrain, and official det/seg); `prefix` keeps only keys under it.
        in_chans, depths, dims: the official facebookresearch config's argument names
            (`in_chans=3, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768]`), accepted as aliases.

    `forward(x)` returns a list of NCHW maps (one per selected stage, each through its own
    LayerNorm `norm{i}`).
    """

    def __init__(self, arch: Union[str, Dict[str, Any]] = "tiny", in_channels: int = 3,
                 out_indices: Optional[Sequence[int]] = (0, 1, 2, 3),
                 out_features: Optional[Sequence[str]] = None, drop_path_rate: float = 0.0,
                 layer_scale_init_value: Optional[float] = None, use_grn: Optional[bool] = None,
                 frozen_stages: int = 0, with_cp: bool = False, gap_before_final_norm: bool = False,
                 init_cfg: Optional[Union[Dict[str, Any], List[Dict[str, Any]]]] = None,
                 in_chans: Optional[int] = None, depths: Optional[Sequence[int]] = None,
                 dims: Optional[Sequence[int]] = None, pretrained: Optional[str] = None) -> None:
        if gap_before_final_norm:
            raise ValueError("gap_before_final_norm=True pools the last stage (classification); "
                             "a segmentation backbone returns spatial maps: use False")
        if (depths is None) != (dims is None):
            raise ValueError("the official-style arguments `depths` and `dims` go together")
        args = _arch_args(dict(depths=depths, channels=dims) if depths is not None else arch)
        args["num_channels"] = in_chans if in_chans is not None else in_channels
        args["drop_path_rate"] = drop_path_rate
        if use_grn is not None:
            args["use_grn"] = bool(use_grn)
            if use_grn and layer_scale_init_value is None:
                args["layer_scale_init_value"] = 0.0
        if layer_scale_init_value is not None:
            args["layer_scale_init_value"] = layer_scale_init_value

        num_stages = len(args["depths"])
        args["num_stages"] = num_stages
        stage_names = [f"stage{i + 1}" for i in range(num_stages)]
        if out_features is not None:
            args["out_features"] = list(out_features)
        else:
            if out_indices is None:
                out_indices = tuple(range(num_stages))
            if isinstance(out_indices, int) and not isinstance(out_indices, bool):
                out_indices = (out_indices,)  # mmpretrain accepts a single int
            # mmseg convention: 0 is the first stage; the core counts the stem as 0.
            args["out_indices"] = [i + 1 for i in normalize_indices(
                out_indices, stage_names, name="out_indices (0 = first stage)")]

        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or \
                not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be an int in [-1, {num_stages}] (-1 or 0: none; "
                             f"k: stem and the first k stages), got {frozen_stages!r}")
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("give either `pretrained` (deprecated) or `init_cfg`, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        super().__init__(ConvNextConfig(**args), frozen_stages=max(frozen_stages, 0))
        self.init_cfg = init_cfg
        # mmseg's indices of the selected stages (0 = first stage; -1 for the stem).
        self.mmseg_out_indices: List[int] = [i - 1 for i in self.out_indices]
        if with_cp:
            self.gradient_checkpointing_enable()
        self.is_init = False

    def init_weights(self) -> None:
        """Loads `init_cfg`'s pretrained checkpoint; otherwise keeps the construction-time
        initialisation (mmengine calls this after building the model)."""
        if "init_cfg" not in self.__dict__:  # called by the core constructor: default init
            super().init_weights()
            return
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in cfgs if c and c.get("type") == "Pretrained"]
        others = [c for c in cfgs if c and c.get("type") != "Pretrained"]
        if others:
            raise ValueError(f"ConvNeXt init_cfg supports only type='Pretrained' (the default "
                             f"initialisation is the official one); got {others}")
        for cfg in pretrained:
            self.load_pretrained(cfg["checkpoint"], prefix=cfg.get("prefix"))
        self.is_init = True

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> Any:
        """Loads a checkpoint in any supported format into this backbone (non-strict) and logs
        what was missing or unexpected; a shape mismatch is an error.

        Args:
            checkpoint: path of the file (or directory of a saved model).
            prefix: keep only keys starting with it, stripped (e.g. 'backbone.' for a
                segmentor's checkpoint); None loads everything through the format converters.

        Returns:
            The `LoadReport` of `convnext_backbone.checkpoints.load_into`.
        """
        from .checkpoints import load_checkpoint, load_into

        state_dict = load_checkpoint(checkpoint)
        if prefix:
            if not prefix.endswith("."):
                prefix += "."
            selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not selected:
                raise ValueError(f"no key of {checkpoint!r} starts with prefix {prefix!r}; "
                                 f"first keys: {list(state_dict)[:5]}")
            state_dict = selected
        # load_into converts from any format and never leaves a tensor random silently
        report = load_into(self, state_dict, strict=False)
        if report.mismatched_shapes:
            raise ValueError(f"{checkpoint!r} does not fit this ConvNeXt (arch/in_channels?): "
                             f"shape mismatches {report.mismatched_shapes}")
        if report.missing_keys:
            print_log(f"ConvNeXt: {len(report.missing_keys)} tensors not in {checkpoint!r} keep "
                      f"their initialisation: {report.missing_keys}", logger="current", level=30)
        if report.unexpected_keys:
            print_log(f"ConvNeXt: {len(report.unexpected_keys)} tensors of {checkpoint!r} were not "
                      f"used: {report.unexpected_keys[:20]}", logger="current", level=30)
        print_log(f"ConvNeXt: loaded {checkpoint!r} ({report.source_format} format)", logger="current")
        return report

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        return list(super().forward(x, return_dict=True).feature_maps)
