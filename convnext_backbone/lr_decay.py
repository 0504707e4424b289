"""Layer-wise and stage-wise learning-rate decay for ConvNeXt, as in the official code.

`param_groups_lr_decay(model, ...)` is the plain-PyTorch grouping: it returns optimizer
parameter groups, each with its own `lr` and `weight_decay`, for any model whose ConvNeXt
parameters are named in the official layout (`downsample_layers.{i}.*`,
`stages.{i}.{j}.*`), either at the top level (a bare backbone) or under `backbone.`
(an mmseg/mmdet segmentor or detector). The layer ids and scales are exactly those of
the official ConvNeXt repo and of mmseg's `LearningRateDecayOptimizerConstructor`,
so official `paramwise_cfg` values give the same learning rates.

Weight decay: none on 1-D parameters (norm weights, biases, layer scale `gamma`) and
on biases, as in the official code; in addition none on ConvNeXt V2's GRN `gamma`/`beta`
(shaped (1, 1, 1, C), so the official 1-D rule would decay them).

When mmengine is installed, `ConvNextLayerDecayOptimizerConstructor` is registered in
mmengine's root `OPTIM_WRAPPER_CONSTRUCTORS` (so mmseg/mmdet configs find it from their
own scopes):

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        constructor='ConvNextLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6))

This module imports only torch (mmengine optionally).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

from torch import nn

__all__ = ["get_layer_id", "param_groups_lr_decay", "param_groups_from_paramwise_cfg", "DECAY_TYPES"]

DECAY_TYPES = ("layer_wise", "stage_wise")

# Parameters that never get weight decay (besides 1-D tensors and biases).
_NO_DECAY_PATTERNS = (re.compile(r"(^|\.)grn\.(gamma|beta)$"),
                      re.compile(r"(^|\.)(pos_embed|cls_token|mask_token)$"))


def get_layer_id(name: str, num_layers: int, decay_type: str = "layer_wise",
                 backbone_prefix: str = "backbone.") -> int:
    """Layer id of a parameter, as the official ConvNeXt code numbers them.

    Args:
        name: parameter name in the model (e.g. "backbone.stages.2.4.pwconv1.weight").
        num_layers: `paramwise_cfg['num_layers']` (6 for T, 12 for S/B/L/XL in the
            official configs). Ids run from 0 to `num_layers + 1`; the scale of id k is
            `decay_rate ** (num_layers + 1 - k)`.
        decay_type: "layer_wise" or "stage_wise".
        backbone_prefix: prefix of the backbone's parameters ("" for a bare backbone).

    Returns:
        The id; parameters outside the backbone's downsample layers and stages (heads,
        the backbone's out norms) get `num_layers + 1`, i.e. the full learning rate.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {list(DECAY_TYPES)}, got {decay_type!r}")
    top = num_layers + 1
    if not name.startswith(backbone_prefix):
        return top
    local = name[len(backbone_prefix):]
    parts = local.split(".")
    if local in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if parts[0] == "downsample_layers":
        if decay_type == "stage_wise":
            return 0
        return {0: 0, 1: 2, 2: 3}.get(int(parts[1]), num_layers)
    if parts[0] == "stages":
        stage_id = int(parts[1])
        if decay_type == "stage_wise":
            return stage_id + 1
        block_id = int(parts[2])
        if stage_id == 0:
            return 1
        if stage_id == 1:
            return 2
        if stage_id == 2:
            # Groups of three blocks in the deep third stage, as in the official code.
            return 3 + block_id // 3
        return num_layers
    return top


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return any(p.search(name) for p in _NO_DECAY_PATTERNS)


def param_groups_lr_decay(model: nn.Module, base_lr: float, weight_decay: float,
                          decay_rate: float = 0.9, decay_type: str = "layer_wise",
                          num_layers: int = 6, backbone_prefix: Optional[str] = None
                          ) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with layer-/stage-wise learning-rate decay.

    Args:
        model: a model with official-layout ConvNeXt names, e.g. a segmentor (backbone under
            `backbone.`) or a bare `ConvNextBackbone`. A DDP/`module.` wrapper is unwrapped.
        base_lr: learning rate of the head (scale 1).
        weight_decay: weight decay of parameters that are decayed.
        decay_rate: per-layer factor in (0, 1].
        decay_type: "stage_wise" (one id per stage) or "layer_wise" (the third stage
            split in groups of three blocks).
        num_layers: the official `num_layers` (6 for T, 12 for S/B/L/XL).
        backbone_prefix: prefix of the backbone's parameter names; default "backbone."
            when the model has a `backbone` attribute, else "".

    Returns:
        A list of dicts for `torch.optim.*(params=...)`, each with `params`,
        `param_names`, `lr`, `lr_scale`, `weight_decay` and `group_name`. Frozen
        parameters (requires_grad False) are left out.

    Example:
        >>> groups = param_groups_lr_decay(segmentor, 1e-4, 0.05, 0.9, "stage_wise", 6)
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-4)
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {list(DECAY_TYPES)}, got {decay_type!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int (6 for ConvNeXt-T, 12 for S/B/L/XL "
                         f"in the official configs), got {num_layers!r}")
    if not 0.0 < float(decay_rate) <= 1.0:
        raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate!r}")
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP and mmengine wrappers
    if backbone_prefix is None:
        backbone_prefix = "backbone." if isinstance(getattr(model, "backbone", None), nn.Module) else ""

    groups: Dict[str, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = get_layer_id(name, num_layers, decay_type, backbone_prefix)
        if layer_id > num_layers + 1:
            raise ValueError(f"parameter {name!r} gets layer id {layer_id} > num_layers + 1 = "
                             f"{num_layers + 1}; raise num_layers (the official configs use 6 for "
                             f"ConvNeXt-T and 12 for S/B/L/XL)")
        no_decay = _no_weight_decay(name, param)
        group_name = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if group_name not in groups:
            scale = float(decay_rate) ** (num_layers + 1 - layer_id)
            groups[group_name] = {
                "params": [], "param_names": [], "group_name": group_name,
                "lr_scale": scale, "lr": scale * base_lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[group_name]["params"].append(param)
        groups[group_name]["param_names"].append(name)
    return list(groups.values())


def param_groups_from_paramwise_cfg(module: nn.Module, paramwise_cfg: Dict[str, Any],
                                    base_lr: float, base_wd: float, *, default_decay_rate: float,
                                    backbone_prefix: Optional[str] = None,
                                    constructor: str) -> List[Dict[str, Any]]:
    """The optimizer param groups an mmengine LR-decay constructor adds, from its
    `paramwise_cfg` (`decay_rate`, `decay_type`, `num_layers`, and `backbone_prefix` when
    the constructor takes one), checked, with unknown keys named against the valid ones."""
    cfg = dict(paramwise_cfg)
    valid = ["decay_rate", "decay_type", "num_layers"] + (
        ["backbone_prefix"] if backbone_prefix is not None else [])
    unknown = set(cfg) - set(valid)
    if unknown:
        raise ValueError(f"paramwise_cfg keys {sorted(unknown)} are not supported by {constructor}; "
                         f"valid: {', '.join(valid)}")
    if "num_layers" not in cfg:
        raise ValueError("paramwise_cfg needs num_layers (6 for ConvNeXt-T, 12 for S/B/L/XL)")
    kwargs = {} if backbone_prefix is None else {
        "backbone_prefix": cfg.get("backbone_prefix", backbone_prefix)}
    groups = param_groups_lr_decay(module, base_lr, base_wd,
                                   decay_rate=cfg.get("decay_rate", default_decay_rate),
                                   decay_type=cfg.get("decay_type", "layer_wise"),
                                   num_layers=cfg["num_layers"], **kwargs)
    # mmengine's optimizers take extra group keys; param names help debugging but would end
    # up in every optimizer state_dict, so keep only what is needed.
    for g in groups:
        g.pop("param_names")
    return groups


def _register_mmengine_constructor() -> None:
    try:
        from mmengine.optim import DefaultOptimWrapperConstructor
        from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
    except ImportError:  # mmengine is optional
        return
    if "ConvNextLayerDecayOptimizerConstructor" in OPTIM_WRAPPER_CONSTRUCTORS.module_dict:
        return

    @OPTIM_WRAPPER_CONSTRUCTORS.register_module()
    class ConvNextLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
        """mmengine optimizer-wrapper constructor for ConvNeXt learning-rate decay.

        Takes the official `paramwise_cfg`: `decay_rate`, `decay_type`
        ('stage_wise' | 'layer_wise') and `num_layers`; the optimizer's `lr` and
        `weight_decay` are the head's. See `param_groups_lr_decay`.
        """

        def add_params(self, params: List[Dict[str, Any]], module: nn.Module, **kwargs: Any) -> None:
            # 0.9: the official segmentation configs' rate
            params.extend(param_groups_from_paramwise_cfg(
                module, self.paramwise_cfg, self.base_lr, self.base_wd or 0.0,
                default_decay_rate=0.9, constructor="ConvNextLayerDecayOptimizerConstructor"))

    globals()["ConvNextLayerDecayOptimizerConstructor"] = ConvNextLayerDecayOptimizerConstructor
    __all__.append("ConvNextLayerDecayOptimizerConstructor")


_register_mmengine_constructor()
