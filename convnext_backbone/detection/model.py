"""mmengine `BaseModel` around a torchvision detector, and the layer-decay constructor
for it.

mmengine's Runner then provides logging, checkpoints, resume, schedules, AMP and DDP;
the detector itself stays a plain torchvision `MaskRCNN` / `FasterRCNN` (the
`detector` attribute), so its parameters are named `detector.backbone.body.*` (the
ConvNeXt trunk, official layout), `detector.backbone.fpn.*`, `detector.rpn.*`,
`detector.roi_heads.*`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from mmengine.model import BaseModel
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ..lr_decay import param_groups_from_paramwise_cfg

__all__ = ["TorchvisionDetector", "DetectorLayerDecayOptimizerConstructor", "BUILDERS",
           "TRUNK_PREFIX"]

# Where the ConvNeXt trunk sits inside `TorchvisionDetector`.
TRUNK_PREFIX = "detector.backbone.body."

# Keys of a torchvision target that the detector reads.
_TARGET_KEYS = ("boxes", "labels", "masks")


def _builders() -> Dict[str, Any]:
    from ..torchvision import fasterrcnn_convnext_fpn, maskrcnn_convnext_fpn

    return {"maskrcnn_convnext_fpn": maskrcnn_convnext_fpn,
            "fasterrcnn_convnext_fpn": fasterrcnn_convnext_fpn}


BUILDERS = tuple(_builders())


class TorchvisionDetector(BaseModel):
    """A torchvision detector as an mmengine model.

    `forward(inputs, data_samples, mode)`: `inputs` is a list of CHW float images in
    [0, 1]; `data_samples` the matching torchvision targets (dicts). `mode='loss'`
    returns torchvision's loss dict, `'predict'` one dict per image (`boxes`, `labels`,
    `scores`, `masks` (N, 1, H, W) probabilities, in original image coordinates, plus
    `image_id`), `'tensor'` the FPN features.

    Args:
        builder: "maskrcnn_convnext_fpn" or "fasterrcnn_convnext_fpn".
        data_preprocessor: mmengine data preprocessor config (default: moves data to
            the device; torchvision's own transform normalises and resizes).
        init_cfg: mmengine init config (unused by default: the builder initialises).
        **builder_kwargs: arguments of the builder (`arch_or_config`, `num_classes`,
            `checkpoint`, `min_size`, `max_size`, `drop_path_rate`, ...).
    """

    def __init__(self, builder: str = "maskrcnn_convnext_fpn", data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None, **builder_kwargs: Any) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        builders = _builders()
        if builder not in builders:
            raise ValueError(f"unknown detector builder {builder!r}; valid: {sorted(builders)}")
        for key in ("min_size",):  # configs hold lists; torchvision wants a tuple
            if isinstance(builder_kwargs.get(key), list):
                builder_kwargs[key] = tuple(builder_kwargs[key])
        self.detector = builders[builder](**builder_kwargs)

    def forward(self, inputs: List[torch.Tensor], data_samples: Optional[List[Dict[str, Any]]] = None,
                mode: str = "tensor") -> Union[Dict[str, torch.Tensor], List[Dict[str, Any]], Any]:
        images = list(inputs)
        if mode == "loss":
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples (torchvision targets)")
            targets = [{k: t[k] for k in _TARGET_KEYS if k in t} for t in data_samples]
            return self.detector(images, targets)
        if mode == "predict":
            outputs = self.detector(images)
            samples = data_samples or [{} for _ in images]
            return [dict(out, image_id=s.get("image_id")) for out, s in zip(outputs, samples)]
        if mode == "tensor":
            image_list, _ = self.detector.transform(images)
            return self.detector.backbone(image_list.tensors)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


class DetectorLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """ConvNeXt layer-/stage-wise LR decay for `TorchvisionDetector`.

    The same ids and scales as `convnext_backbone.lr_decay.param_groups_lr_decay` (the
    official ConvNeXt numbering), with the trunk found under `detector.backbone.body.`.
    `paramwise_cfg`: `decay_rate`, `decay_type` ('layer_wise' | 'stage_wise'),
    `num_layers` (6 for T, 12 for S/B), optional `backbone_prefix`.
    """

    def add_params(self, params: List[Dict[str, Any]], module: nn.Module, **kwargs: Any) -> None:
        # 0.95: the official detection configs' rate
        params.extend(param_groups_from_paramwise_cfg(
            module, self.paramwise_cfg, self.base_lr, self.base_wd or 0.0,
            default_decay_rate=0.95, backbone_prefix=TRUNK_PREFIX,
            constructor="DetectorLayerDecayOptimizerConstructor"))
