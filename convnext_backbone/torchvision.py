"""torchvision integration: a ConvNeXt + FPN backbone and Mask/Faster R-CNN builders.

Shaped like torchvision's `resnet_fpn_backbone` / `maskrcnn_resnet50_fpn`: the backbone
returns an `OrderedDict[str, Tensor]` keyed ``'0'..'3', 'pool'`` and carries
`out_channels`, so it plugs into any torchvision detector. The ConvNeXt trunk is the
core `ConvNextBackbone` (stages chosen through its `out_features`), so its parameter names,
checkpoint loading and shape contract are the package's own.

Inside this module `import torchvision` is the real torchvision (absolute imports).

Example:
    >>> from convnext_backbone.torchvision import convnext_fpn_backbone
    >>> backbone = convnext_fpn_backbone("tiny").eval()
    >>> {k: tuple(v.shape) for k, v in backbone(torch.randn(1, 3, 224, 224)).items()}
    {'0': (1, 256, 56, 56), '1': (1, 256, 28, 28), '2': (1, 256, 14, 14), '3': (1, 256, 7, 7), 'pool': (1, 256, 4, 4)}
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

try:
    import torchvision  # noqa: F401  (the real torchvision: imports are absolute)
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops.feature_pyramid_network import (ExtraFPNBlock, FeaturePyramidNetwork,
                                                         LastLevelMaxPool)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("convnext_backbone.torchvision needs torchvision: "
                      "pip install 'convnext-backbone[detection]'") from exc

from .configuration import ConvNextConfig, variant_key
from .modeling import ConvNextBackbone, ShapeSpec

__all__ = [
    "ConvNextFPNBackbone", "convnext_fpn_backbone", "maskrcnn_convnext_fpn",
    "fasterrcnn_convnext_fpn", "DETECTION_DROP_PATH", "MULTISCALE_MIN_SIZES",
]

# Stochastic depth used by the official ConvNeXt COCO configs (Mask / Cascade Mask R-CNN).
DETECTION_DROP_PATH: Dict[str, float] = {
    "tiny": 0.4, "small": 0.6, "base": 0.7, "large": 0.7, "xlarge": 0.8,
}
# The paper's multi-scale training: short side in 480..800 (step 32), long side <= 1333.
MULTISCALE_MIN_SIZES = tuple(range(480, 801, 32))

ArchOrConfig = Union[str, ConvNextConfig, Mapping[str, Any]]


def _make_config(arch_or_config: ArchOrConfig, returned_stages: Sequence[int],
                 overrides: Dict[str, Any]) -> ConvNextConfig:
    out_features = [f"stage{i}" for i in returned_stages]
    overrides = dict(overrides, out_features=out_features)
    overrides.pop("out_indices", None)
    if isinstance(arch_or_config, ConvNextConfig):
        return arch_or_config.copy(**overrides)
    if isinstance(arch_or_config, Mapping):
        return ConvNextConfig.from_dict(dict(arch_or_config), **overrides)
    if isinstance(arch_or_config, str):
        return ConvNextConfig.from_variant(arch_or_config, **overrides)
    raise TypeError("arch_or_config must be a variant name (e.g. 'tiny'), a ConvNextConfig or a "
                    f"config dict, got {type(arch_or_config).__name__}")


def _check_stage_args(trainable_stages: Any, returned_stages: Any, num_stages: int) -> list:
    if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int) or \
            not 0 <= trainable_stages <= num_stages:
        raise ValueError(f"trainable_stages should be an int in the range [0,{num_stages}] "
                         f"(counted from the last stage; {num_stages} also trains the stem), "
                         f"got {trainable_stages!r}")
    if returned_stages is None:
        returned_stages = list(range(1, num_stages + 1))
    if isinstance(returned_stages, (str, bytes)) or not isinstance(returned_stages, Sequence):
        raise ValueError(f"returned_stages should be a sequence of ints in the range [1,{num_stages}], "
                         f"got {returned_stages!r}")
    stages = list(returned_stages)
    if not stages or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= num_stages
                         for s in stages):
        raise ValueError(f"Each returned stage should be in the range [1,{num_stages}], "
                         f"got {returned_stages!r}")
    if stages != sorted(set(stages)):
        raise ValueError(f"returned_stages should be increasing without repeats, got {returned_stages!r}")
    return stages


def _load_weights(backbone: ConvNextBackbone, checkpoint: Union[str, os.PathLike]) -> None:
    """Loads any supported checkpoint format (file or `save_pretrained` directory) into the
    trunk. Only the per-stage out norms may be missing (classification checkpoints have
    none; they start as identity LayerNorms and `load_into` logs them); anything else
    missing, unexpected or mis-shaped raises."""
    from . import checkpoints

    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        path = checkpoints._find_weights(path)
    report = checkpoints.load_into(backbone, checkpoints.load_checkpoint(path), strict=False)
    trunk_missing = [k for k in report.missing_keys if not k.startswith("norm")]
    if trunk_missing or report.unexpected_keys or report.mismatched_shapes:
        raise ValueError(f"checkpoint {path!r} does not fit this ConvNeXt "
                         f"({report.source_format} format):\n{report}")


class ConvNextFPNBackbone(nn.Module):
    """`ConvNextBackbone` + torchvision `FeaturePyramidNetwork` (the `BackboneWithFPN` shape).

    Args:
        body: the ConvNeXt trunk; every map it returns feeds the FPN.
        out_channels: channels of every FPN level.
        extra_blocks: torchvision extra FPN block; `LastLevelMaxPool()` when None.
        norm_layer: optional norm for the FPN convs (torchvision's `norm_layer`).

    Attributes:
        out_channels: channels of every returned level (what torchvision detectors read).
    """

    def __init__(self, body: ConvNextBackbone, out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list=list(body.channels), out_channels=out_channels,
                                         extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """{key: ShapeSpec(channels, stride)}: '0'.. per returned stage, then 'pool' when
        the extra block is `LastLevelMaxPool` (stride of the last level x2)."""
        shapes = {str(i): ShapeSpec(self.out_channels, s) for i, s in enumerate(self.body.strides)}
        if isinstance(self.fpn.extra_blocks, LastLevelMaxPool):
            shapes["pool"] = ShapeSpec(self.out_channels, self.body.strides[-1] * 2)
        return shapes

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feature_maps = self.body(x).feature_maps
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feature_maps)))


def convnext_fpn_backbone(arch_or_config: ArchOrConfig, checkpoint: Optional[Union[str, os.PathLike]] = None,
                          trainable_stages: int = 4, returned_stages: Sequence[int] = (1, 2, 3, 4),
                          extra_blocks: Optional[ExtraFPNBlock] = None,
                          norm_layer: Optional[Callable[..., nn.Module]] = None,
                          out_channels: int = 256, **config_overrides: Any) -> ConvNextFPNBackbone:
    """A ConvNeXt + FPN backbone for torchvision detectors (like `resnet_fpn_backbone`).

    Args:
        arch_or_config: a variant name ("tiny", "small", "base", ..., "v2-tiny"), a
            `ConvNextConfig` or a config dict.
        checkpoint: optional weights file in any supported format (official, timm,
            transformers, torchvision, mmpretrain; see `convnext_backbone.checkpoints`).
        trainable_stages: stages trained, counted from the last one, in [0,4]; 4 trains
            all of them and the stem. Frozen stages stay in eval mode.
        returned_stages: stages (1..4) that feed the FPN; keys are '0'.. in this order.
        extra_blocks: torchvision extra FPN block (default `LastLevelMaxPool`, key 'pool').
        norm_layer: norm for the FPN convs (None: plain convs, as torchvision).
        out_channels: FPN width.
        **config_overrides: `ConvNextConfig` fields, e.g. `drop_path_rate=0.4`.

    Raises:
        ValueError: `trainable_stages` outside [0,4] or `returned_stages` outside [1,4].
    """
    stages = _check_stage_args(trainable_stages, returned_stages, 4)
    config = _make_config(arch_or_config, stages, config_overrides)
    if config.num_stages != 4:
        # The stage checks above assume the four-stage ConvNeXt layout.
        raise ValueError(f"convnext_fpn_backbone needs a 4-stage config, got num_stages={config.num_stages}")
    body = ConvNextBackbone(config)
    if checkpoint is not None:
        _load_weights(body, checkpoint)
    body.frozen_stages = config.num_stages - trainable_stages
    body._freeze_stages()
    return ConvNextFPNBackbone(body, out_channels=out_channels, extra_blocks=extra_blocks,
                               norm_layer=norm_layer)


def _detector_backbone(arch_or_config: ArchOrConfig, checkpoint, trainable_stages: int,
                       drop_path_rate: Optional[float], out_channels: int,
                       backbone_overrides: Optional[Dict[str, Any]]) -> ConvNextFPNBackbone:
    overrides = dict(backbone_overrides or {})
    if drop_path_rate is None and isinstance(arch_or_config, str):
        drop_path_rate = DETECTION_DROP_PATH.get(variant_key(arch_or_config).replace("v2-", ""))
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    return convnext_fpn_backbone(arch_or_config, checkpoint=checkpoint, trainable_stages=trainable_stages,
                                 out_channels=out_channels, **overrides)


def _size_kwargs(min_size: Union[int, Sequence[int]], max_size: int) -> Dict[str, Any]:
    # torchvision picks one of `min_size` at random per batch in training (multi-scale)
    # and uses the last one at test time.
    if isinstance(min_size, Sequence) and not isinstance(min_size, (str, bytes)):
        min_size = tuple(int(s) for s in min_size)
    return dict(min_size=min_size, max_size=int(max_size))


def fasterrcnn_convnext_fpn(arch_or_config: ArchOrConfig = "tiny", *, num_classes: int = 91,
                            checkpoint: Optional[Union[str, os.PathLike]] = None,
                            trainable_stages: int = 4, drop_path_rate: Optional[float] = None,
                            min_size: Union[int, Sequence[int]] = 800, max_size: int = 1333,
                            out_channels: int = 256, box_representation_size: int = 1024,
                            anchor_sizes: Optional[Sequence[int]] = None,
                            backbone_overrides: Optional[Dict[str, Any]] = None,
                            **detector_kwargs: Any) -> FasterRCNN:
    """torchvision `FasterRCNN` on a ConvNeXt + FPN backbone.

    Args:
        arch_or_config: variant name, `ConvNextConfig` or config dict.
        num_classes: including background (COCO: 91 with the original ids, 81 contiguous).
        checkpoint: optional backbone weights (any supported format).
        trainable_stages: see `convnext_fpn_backbone`.
        drop_path_rate: stochastic depth; None takes the official COCO value of a named
            variant (`DETECTION_DROP_PATH`: T 0.4, S 0.6, B 0.7) or the config's own.
        min_size / max_size: torchvision's resize; a sequence of min sizes trains
            multi-scale (`MULTISCALE_MIN_SIZES` is the paper's 480..800).
        out_channels: FPN width.
        box_representation_size: width of the two-layer box head (torchvision: 1024).
        anchor_sizes: one anchor size per FPN level (torchvision: 32, 64, 128, 256, 512),
            aspect ratios 0.5, 1, 2; smaller sizes suit small images.
        backbone_overrides: extra `ConvNextConfig` fields.
        **detector_kwargs: passed to `FasterRCNN` (rpn/box thresholds, sampling, ...).
    """
    backbone = _detector_backbone(arch_or_config, checkpoint, trainable_stages, drop_path_rate,
                                  out_channels, backbone_overrides)
    _box_head(detector_kwargs, out_channels, box_representation_size, num_classes)
    _anchors(detector_kwargs, anchor_sizes, backbone)
    return FasterRCNN(backbone, num_classes=num_classes if "box_predictor" not in detector_kwargs else None,
                      **_size_kwargs(min_size, max_size), **detector_kwargs)


def _box_head(kwargs: Dict[str, Any], out_channels: int, representation_size: int,
              num_classes: int) -> None:
    # torchvision builds its 1024-wide head itself; other widths need head and predictor.
    if representation_size == 1024 or "box_head" in kwargs or "box_predictor" in kwargs:
        return
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    kwargs["box_head"] = TwoMLPHead(out_channels * 7 * 7, representation_size)
    kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)


def _anchors(kwargs: Dict[str, Any], anchor_sizes: Optional[Sequence[int]],
             backbone: ConvNextFPNBackbone) -> None:
    if anchor_sizes is None or "rpn_anchor_generator" in kwargs:
        return
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    levels = len(backbone.output_shape())
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one size per FPN level ({levels}: "
                         f"{list(backbone.output_shape())}), got {list(anchor_sizes)}")
    kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                                                     ((0.5, 1.0, 2.0),) * levels)


def maskrcnn_convnext_fpn(arch_or_config: ArchOrConfig = "tiny", *, num_classes: int = 91,
                          checkpoint: Optional[Union[str, os.PathLike]] = None,
                          trainable_stages: int = 4, drop_path_rate: Optional[float] = None,
                          min_size: Union[int, Sequence[int]] = 800, max_size: int = 1333,
                          out_channels: int = 256, box_representation_size: int = 1024,
                          mask_head_channels: Sequence[int] = (256, 256, 256, 256),
                          anchor_sizes: Optional[Sequence[int]] = None,
                          backbone_overrides: Optional[Dict[str, Any]] = None,
                          **detector_kwargs: Any) -> MaskRCNN:
    """torchvision `MaskRCNN` on a ConvNeXt + FPN backbone (the paper's COCO detector).

    With ConvNeXt-T and the defaults it has 48,153,553 parameters (the paper: 48M).

    Args:
        arch_or_config: variant name, `ConvNextConfig` or config dict.
        num_classes: including background.
        checkpoint: optional backbone weights (any supported format).
        trainable_stages: see `convnext_fpn_backbone`.
        drop_path_rate: None takes the official COCO value of a named variant.
        min_size / max_size: torchvision's resize; a sequence trains multi-scale.
        out_channels: FPN width.
        box_representation_size: width of the two-layer box head (torchvision: 1024).
        mask_head_channels: widths of the mask head's convs (torchvision: 4 x 256);
            smaller values make CPU demos fast.
        anchor_sizes: one anchor size per FPN level (torchvision: 32, 64, 128, 256, 512).
        backbone_overrides: extra `ConvNextConfig` fields.
        **detector_kwargs: passed to `MaskRCNN`.

    Example:
        >>> model = maskrcnn_convnext_fpn("tiny", num_classes=91)
        >>> round(sum(p.numel() for p in model.parameters()) / 1e6)
        48
    """
    backbone = _detector_backbone(arch_or_config, checkpoint, trainable_stages, drop_path_rate,
                                  out_channels, backbone_overrides)
    _box_head(detector_kwargs, out_channels, box_representation_size, num_classes)
    _anchors(detector_kwargs, anchor_sizes, backbone)
    mask_head_channels = tuple(int(c) for c in mask_head_channels)
    custom_mask_head = mask_head_channels != (256, 256, 256, 256)
    if custom_mask_head and "mask_head" not in detector_kwargs:
        detector_kwargs["mask_head"] = MaskRCNNHeads(out_channels, mask_head_channels, dilation=1)
    # With a box predictor built above, MaskRCNN gets num_classes=None and cannot size
    # its mask predictor itself.
    if (custom_mask_head or "box_predictor" in detector_kwargs) and \
            "mask_predictor" not in detector_kwargs:
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

        detector_kwargs["mask_predictor"] = MaskRCNNPredictor(mask_head_channels[-1],
                                                              mask_head_channels[-1], num_classes)
    needs_num_classes = "box_predictor" not in detector_kwargs
    return MaskRCNN(backbone, num_classes=num_classes if needs_num_classes else None,
                    **_size_kwargs(min_size, max_size), **detector_kwargs)
