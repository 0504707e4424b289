"""ConvNeXt V1/V2 in plain PyTorch: backbone, bare model and classifier.

Parameter names follow the official facebookresearch layout (`downsample_layers.{i}`,
`stages.{i}.{j}.dwconv|norm|pwconv1|grn|pwconv2|gamma`, per-stage out norms `norm{i}`),
so official det/seg checkpoints load as they are and mmseg's layer-wise LR decay
recognises the layers. Public API and outputs follow transformers' ConvNeXT.
This module imports only torch.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import ops as _ops
from .configuration import ConvNextConfig
from .outputs import (BackboneOutput, BaseModelOutputWithPoolingAndNoAttention,
                      ImageClassifierOutputWithNoAttention)

__all__ = [
    "LayerNorm2d", "GlobalResponseNorm", "DropPath", "ConvNextBlock", "ConvNextPreTrainedModel",
    "ConvNextBackbone", "ConvNextModel", "ConvNextForImageClassification", "ShapeSpec",
]

# Norms inside the network use the official epsilon; `config.layer_norm_eps` is only the
# pooled final norm's (as in transformers).
NORM_EPS = 1e-6


class ShapeSpec(tuple):
    """(channels, stride) of one output, as detectron2's ShapeSpec."""

    def __new__(cls, channels: int, stride: int) -> "ShapeSpec":
        return super().__new__(cls, (channels, stride))

    @property
    def channels(self) -> int:
        return self[0]

    @property
    def stride(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        return f"ShapeSpec(channels={self[0]}, stride={self[1]})"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ops.use_fast_layer_norm(self, x):  # Triton, for channels_last CUDA tensors
            return _ops.layer_norm_2d(self, x)
        # permute + F.layer_norm is faster than hand-written mean/var (pytorch #76012)
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN on channels-last input; parameters shaped (1, 1, 1, C) as in
    the official V2 code."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x


class DropPath(nn.Module):
    """Stochastic depth per sample (scaled by the keep probability)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_new":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "selu":
        return nn.SELU()
    raise ValueError(f"Unknown activation {name!r}; valid: gelu, relu, selu, gelu_new")


class ConvNextBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4x -> act -> [GRN] -> Linear -> [layer scale]
    -> drop path -> residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 hidden_act: str = "gelu", use_grn: bool = False) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = _activation(hidden_act)
        self.grn = GlobalResponseNorm(4 * dim) if use_grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # Set by the stage for every block but its last: the output is the next block's
        # input, so the fast path also writes it in the compute dtype for that block's conv.
        self.feeds_block = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fused Triton fast path (CUDA + Triton, V1 block options); identical parameters,
        # outputs within rounding. CONVNEXT_FAST_PATH=0 forces the code below.
        if _ops.use_fast_path(self, x):
            return _ops.block_forward(self, x)
        # CPU fp32 inference: the pointwise layers in oneDNN with fused epilogues.
        if _ops.use_cpu_path(self, x):
            return _ops.cpu_block_forward(self, x)
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        if self.grn is not None:
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


@torch.fx.wrap
def _check_pixel_values(pixel_values: torch.Tensor, num_channels: int) -> torch.Tensor:
    # A leaf under torch.fx, so tracing records it instead of failing on the checks.
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be 4-D (batch, channels, height, width), "
                         f"got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                         f"num_channels={num_channels} (shape {tuple(pixel_values.shape)}); "
                         f"pass NCHW input, e.g. x.permute(0, 3, 1, 2) for NHWC")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}; "
                        f"convert with .float() and normalise first")
    return pixel_values


@torch.fx.wrap
def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    # Branch-free, non-negative arithmetic: torch.export / the ONNX exporter with dynamic
    # H, W would otherwise bake in the example input's branch, and lower Python's modulo
    # of a negative size wrongly (silently wrong shapes for other input sizes).
    pad_h = (multiple - x.shape[-2] % multiple) % multiple
    pad_w = (multiple - x.shape[-1] % multiple) % multiple
    # Concrete sizes needing no padding (eager, or static shapes under compile): F.pad
    # would still copy the whole input.
    if (type(pad_h) is int and type(pad_w) is int and pad_h == 0 and pad_w == 0
            and not torch.jit.is_tracing()):
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


@torch.fx.wrap
def _crop_to_stride(x: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    # Always slice (a free view when nothing is cropped); see _pad_to_multiple for why.
    out_h, out_w = (height + stride - 1) // stride, (width + stride - 1) // stride
    return x[:, :, :out_h, :out_w]


def _input_size(x: torch.Tensor) -> Tuple[int, int]:
    return x.shape[-2], x.shape[-1]


class ConvNextPreTrainedModel(nn.Module):
    """Shared construction, weight init, gradient checkpointing and checkpoint I/O."""

    config_class = ConvNextConfig
    # Which part of a checkpoint this class consumes; see convnext_backbone.checkpoints.
    model_kind = "model"

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        if not isinstance(config, ConvNextConfig):
            raise TypeError(f"config must be a ConvNextConfig, got {type(config).__name__}; "
                            f"use ConvNextConfig(...) or ConvNextConfig.from_variant('tiny')")
        self.config = config
        self.gradient_checkpointing = False

    # --- construction shared by every head -----------------------------------------
    def _build_trunk(self) -> None:
        cfg = self.config
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(cfg.num_channels, cfg.hidden_sizes[0], kernel_size=cfg.patch_size,
                      stride=cfg.patch_size),
            LayerNorm2d(cfg.hidden_sizes[0], eps=NORM_EPS),
        ))
        for i in range(1, cfg.num_stages):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(cfg.hidden_sizes[i - 1], eps=NORM_EPS),
                nn.Conv2d(cfg.hidden_sizes[i - 1], cfg.hidden_sizes[i], kernel_size=2, stride=2),
            ))
        num_blocks = sum(cfg.depths)
        # Linear stochastic-depth schedule over all blocks (plain Python: works on meta too).
        rates = [cfg.drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.stages = nn.ModuleList()
        start = 0
        for i, depth in enumerate(cfg.depths):
            self.stages.append(nn.Sequential(*[
                ConvNextBlock(cfg.hidden_sizes[i], drop_path=rates[start + j],
                              layer_scale_init_value=cfg.layer_scale_init_value,
                              hidden_act=cfg.hidden_act, use_grn=cfg.use_grn)
                for j in range(depth)
            ]))
            for block in list(self.stages[i])[:-1]:
                block.feeds_block = True
            start += depth

    def _run_blocks(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.stages[i]:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x
        if torch.compiler.is_compiling():
            return self.stages[i](x)
        with _ops.block_sequence():  # lets the fast path hand each block the next one's input
            return self.stages[i](x)

    def _run_stem(self, x: torch.Tensor, feeds_block: bool) -> torch.Tensor:
        stem = self.downsample_layers[0]
        if len(stem) == 2 and type(stem[0]) is nn.Conv2d and type(stem[1]) is LayerNorm2d:
            conv, norm = stem
            if _ops.use_fast_stem(stem, conv, norm, x):  # one Triton kernel (CUDA, autocast)
                return _ops.stem_forward(conv, norm, x, feeds_block)
        return stem(x)

    def _run_downsample(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.downsample_layers[i]
        if len(layer) == 2 and type(layer[0]) is LayerNorm2d and type(layer[1]) is nn.Conv2d:
            norm, conv = layer
            if _ops.use_fast_downsample(layer, norm, conv, x):  # LayerNorm in the conv's dtype
                return _ops.downsample_forward(norm, conv, x)
        return layer(x)

    def _forward_trunk(self, x: torch.Tensor, num_stages: int) -> List[torch.Tensor]:
        """Outputs of `stage_names[: num_stages + 1]`: the stem, then each stage."""
        x = self._run_stem(x, feeds_block=num_stages > 0)
        outputs = [x]
        for i in range(num_stages):
            if i > 0:
                x = self._run_downsample(i, x)
            x = self._run_blocks(i, x)
            outputs.append(x)
        # The stem's copy for the first block, if that block did not take it.
        _ops.discard_low_precision_copy(outputs[0])
        return outputs

    # --- weights -------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation: normal(0, initializer_range) for conv/linear."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GlobalResponseNorm):
            nn.init.zeros_(module.gamma)
            nn.init.zeros_(module.beta)
        elif isinstance(module, ConvNextBlock) and module.gamma is not None:
            nn.init.constant_(module.gamma, self.config.layer_scale_init_value)

    def init_weights(self) -> None:
        self.apply(self._init_weights)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in backward; outputs and gradients are unchanged."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # --- checkpoints ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, strict: bool = True,
                        map_location: Union[str, torch.device] = "cpu", **overrides: Any):
        """Loads a `save_pretrained` / transformers directory, or one checkpoint file in
        any supported format (official, timm, transformers, torchvision, mmpretrain).
        Overrides (e.g. `out_features=...`) apply on top of the stored or inferred config."""
        from .checkpoints import load_pretrained

        return load_pretrained(cls, path, strict=strict, map_location=map_location, **overrides)

    def save_pretrained(self, directory: Union[str, os.PathLike], *,
                        safe_serialization: bool = True) -> str:
        """Writes `config.json` and `model.safetensors` (atomically) into `directory`."""
        from .checkpoints import save_pretrained

        return save_pretrained(self, directory, safe_serialization=safe_serialization)


class ConvNextBackbone(ConvNextPreTrainedModel):
    """Multi-scale ConvNeXt backbone.

    Returns one NCHW map per stage selected by `config.out_features`/`out_indices`
    (resolved against `stage_names` = ["stem", "stage1", ...]), each through its own
    channels-first LayerNorm. Inputs of any size are padded to the total stride and
    every output is cropped to `ceil(H / stride) x ceil(W / stride)`.

    Args:
        config: the architecture and stage selection.
        frozen_stages: 0 trains everything; k freezes the stem and stages 1..k (held in
            eval mode, re-applied after `.train()`); out norms stay trainable.

    Example:
        >>> cfg = ConvNextConfig.from_variant("tiny", out_features=["stage1", "stage2", "stage3", "stage4"])
        >>> backbone = ConvNextBackbone(cfg).eval()
        >>> [tuple(f.shape) for f in backbone(torch.randn(1, 3, 224, 224)).feature_maps]
        [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    """

    model_kind = "backbone"

    def __init__(self, config: ConvNextConfig, frozen_stages: int = 0) -> None:
        super().__init__(config)
        self._build_trunk()
        self.stage_names: List[str] = list(config.stage_names)
        self.out_features: List[str] = config.out_features
        self.out_indices: List[int] = config.out_indices
        self.channels: List[int] = [config.channels[i] for i in self.out_indices]
        self.strides: List[int] = [config.strides[i] for i in self.out_indices]
        self.size_divisibility: int = config.total_stride
        self._num_stages_to_run = max(self.out_indices)
        for name, channels in zip(self.out_features, self.channels):
            self.add_module(self.out_norm_name(name), LayerNorm2d(channels, eps=NORM_EPS))
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or \
                not 0 <= frozen_stages <= config.num_stages:
            raise ValueError(f"frozen_stages must be an int in [0, {config.num_stages}] "
                             f"(0: none; k: stem and stages 1..k), got {frozen_stages!r}")
        self.frozen_stages = frozen_stages
        self.init_weights()
        self._freeze_stages()

    @staticmethod
    def out_norm_name(stage_name: str) -> str:
        """Module name of a stage's out norm: official `norm{i}` for stage i+1, `norm_stem`."""
        return "norm_stem" if stage_name == "stem" else f"norm{int(stage_name[len('stage'):]) - 1}"

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """{stage name: ShapeSpec(channels, stride)} of every returned map."""
        return {n: ShapeSpec(c, s) for n, c, s in zip(self.out_features, self.channels, self.strides)}

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages):
            for module in (self.downsample_layers[i], self.stages[i]):
                module.eval()
                for p in module.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> "ConvNextBackbone":
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        return_dict = True if return_dict is None else return_dict
        pixel_values = _check_pixel_values(pixel_values, self.config.num_channels)
        height, width = _input_size(pixel_values)
        x = _pad_to_multiple(pixel_values, self.size_divisibility)

        # Stages after the last selected one are skipped unless hidden states are asked for.
        num_stages = self.config.num_stages if output_hidden_states else self._num_stages_to_run
        outputs = self._forward_trunk(x, num_stages)
        outputs = [_crop_to_stride(out, height, width, stride)
                   for out, stride in zip(outputs, self.config.strides)]
        feature_maps = [getattr(self, self.out_norm_name(self.stage_names[i]))(outputs[i])
                        for i in self.out_indices]
        # hidden_states as in transformers: the stem's output, then each stage's (unnormed).
        hidden_states = outputs
        if not return_dict:
            out: Tuple[Any, ...] = (tuple(feature_maps),)
            return out + (tuple(hidden_states),) if output_hidden_states else out
        return BackboneOutput(feature_maps=tuple(feature_maps),
                              hidden_states=tuple(hidden_states) if output_hidden_states else None)


class ConvNextModel(ConvNextPreTrainedModel):
    """Bare ConvNeXt: `last_hidden_state` (NCHW), `pooler_output` (LayerNorm of the
    global average pool) and, on request, `hidden_states` (embeddings output, then every
    stage's output)."""

    model_kind = "model"

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__(config)
        self._build_trunk()
        self.norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        self.init_weights()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        return_dict = True if return_dict is None else return_dict
        x = _check_pixel_values(pixel_values, self.config.num_channels)
        hidden_states = self._forward_trunk(x, self.config.num_stages)
        x = hidden_states[-1]
        pooled = self.norm(x.mean(dim=(-2, -1)))
        if not return_dict:
            out = (x, pooled)
            return out + (tuple(hidden_states),) if output_hidden_states else out
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=x, pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None)


class ConvNextForImageClassification(ConvNextPreTrainedModel):
    """ConvNeXt with a linear classifier on the pooled features. With `labels`:
    cross-entropy, or mean-squared error when `num_labels == 1`."""

    model_kind = "classifier"

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__(config)
        self.convnext = ConvNextModel(config)
        self.classifier = (nn.Linear(config.hidden_sizes[-1], config.num_labels)
                           if config.num_labels > 0 else nn.Identity())
        self.classifier.apply(self._init_weights)  # the trunk initialised itself

    def gradient_checkpointing_enable(self) -> None:
        super().gradient_checkpointing_enable()
        self.convnext.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        super().gradient_checkpointing_disable()
        self.convnext.gradient_checkpointing_disable()

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None):
        return_dict = True if return_dict is None else return_dict
        outputs = self.convnext(pixel_values, output_hidden_states=output_hidden_states,
                                return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            else:
                loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        if not return_dict:
            out = (logits,) + ((outputs.hidden_states,) if output_hidden_states else ())
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits,
                                                    hidden_states=outputs.hidden_states)
