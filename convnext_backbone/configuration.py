"""`ConvNextConfig`: the one place where ConvNeXt's shapes and options are declared.

Follows transformers' `ConvNextConfig` (same parameter names and defaults) and adds a
ConvNeXt V2 switch (`use_grn`) and named variants (`ConvNextConfig.from_variant`).
Imports only the standard library.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .stage_selection import resolve_out_features_out_indices

__all__ = ["ConvNextConfig", "VARIANTS", "SUPPORTED_ACTIVATIONS", "variant_key"]

SUPPORTED_ACTIVATIONS = ("gelu", "relu", "selu", "gelu_new")

# Depths and widths from the ConvNeXt (arXiv 2201.03545) and ConvNeXt V2 (arXiv 2301.00808)
# papers. V2 uses GRN in the MLP and no layer scale.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768]),
    "small": dict(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768]),
    "base": dict(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024]),
    "large": dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536]),
    "xlarge": dict(depths=[3, 3, 27, 3], hidden_sizes=[256, 512, 1024, 2048]),
    "v2-atto": dict(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320]),
    "v2-femto": dict(depths=[2, 2, 6, 2], hidden_sizes=[48, 96, 192, 384]),
    "v2-pico": dict(depths=[2, 2, 6, 2], hidden_sizes=[64, 128, 256, 512]),
    "v2-nano": dict(depths=[2, 2, 8, 2], hidden_sizes=[80, 160, 320, 640]),
    "v2-tiny": dict(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768]),
    "v2-base": dict(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024]),
    "v2-large": dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536]),
    "v2-huge": dict(depths=[3, 3, 27, 3], hidden_sizes=[352, 704, 1408, 2816]),
}
for _name, _args in VARIANTS.items():
    if _name.startswith("v2-"):
        _args.update(use_grn=True, layer_scale_init_value=0.0)


def _as_int_list(name: str, value: Any, length: int) -> List[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"`{name}` must be a list of {length} positive ints, got {value!r}")
    values = list(value)
    if len(values) != length:
        raise ValueError(
            f"`{name}` must have one entry per stage (num_stages={length}), "
            f"got {len(values)}: {values}"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"`{name}` entries must be positive ints, got {values}")
    return values


def variant_key(name: str) -> str:
    """The `VARIANTS` key a variant name means, in any of the spellings the peers use
    ("tiny", "convnext_tiny", "ConvNeXt-V2-Base", "v2_base", "v2base"); mmpretrain's
    V2-only sizes ("atto", "femto", "pico", "nano", "huge") mean their V2 variant. Raises
    ValueError naming the valid variants."""
    key = str(name).strip().lower().replace("_", "-")
    if key.startswith("convnext-"):
        key = key[len("convnext-"):]
    if key.startswith("v2") and not key.startswith("v2-"):
        key = "v2-" + key[2:]
    if key not in VARIANTS and f"v2-{key}" in VARIANTS:
        key = f"v2-{key}"
    if key not in VARIANTS:
        raise ValueError(f"Unknown ConvNeXt variant {name!r}; valid: {list(VARIANTS)}")
    return key


class ConvNextConfig:
    """Configuration of a ConvNeXt model (transformers' `ConvNextConfig` API).

    Args:
        num_channels: input channels.
        patch_size: stem patchify kernel and stride.
        num_stages: number of stages.
        hidden_sizes: channels of each stage (default `[96, 192, 384, 768]`).
        depths: blocks in each stage (default `[3, 3, 9, 3]`).
        hidden_act: one of "gelu", "relu", "selu", "gelu_new".
        initializer_range: std of the normal init of conv/linear weights.
        layer_norm_eps: epsilon of the pooled final LayerNorm (the other norms use 1e-6,
            as in the official code and transformers).
        layer_scale_init_value: initial layer scale; `0` disables layer scale.
        drop_path_rate: stochastic depth rate, linearly increasing over all blocks.
        image_size: nominal input size (metadata, any size is accepted).
        out_features / out_indices: stages a backbone returns, resolved against
            `stage_names` ("stem", "stage1", ...); index 0 is the stem.
        use_grn: ConvNeXt V2 switch, Global Response Normalisation in each block's MLP.
        num_labels / id2label / label2id: classification head.
    """

    model_type = "convnext"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 4,
        num_stages: int = 4,
        hidden_sizes: Optional[Sequence[int]] = None,
        depths: Optional[Sequence[int]] = None,
        hidden_act: str = "gelu",
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.0,
        image_size: int = 224,
        out_features: Optional[Sequence[str]] = None,
        out_indices: Optional[Sequence[int]] = None,
        use_grn: bool = False,
        num_labels: Optional[int] = None,
        id2label: Optional[Dict[Any, str]] = None,
        label2id: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("num_channels", num_channels), ("patch_size", patch_size),
                            ("num_stages", num_stages), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.num_stages = num_stages
        self.hidden_sizes = _as_int_list(
            "hidden_sizes", [96, 192, 384, 768] if hidden_sizes is None else hidden_sizes, num_stages)
        self.depths = _as_int_list("depths", [3, 3, 9, 3] if depths is None else depths, num_stages)
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"`hidden_act` must be one of {list(SUPPORTED_ACTIVATIONS)}, got {hidden_act!r}")
        self.hidden_act = hidden_act
        if not initializer_range > 0:
            raise ValueError(f"`initializer_range` must be > 0, got {initializer_range}")
        self.initializer_range = float(initializer_range)
        if not layer_norm_eps > 0:
            raise ValueError(f"`layer_norm_eps` must be > 0, got {layer_norm_eps}")
        self.layer_norm_eps = float(layer_norm_eps)
        if not layer_scale_init_value >= 0:
            raise ValueError(
                f"`layer_scale_init_value` must be >= 0 (0 disables layer scale), got {layer_scale_init_value}")
        self.layer_scale_init_value = float(layer_scale_init_value)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` must be in [0, 1), got {drop_path_rate}")
        self.drop_path_rate = float(drop_path_rate)
        self.image_size = image_size
        self.use_grn = bool(use_grn)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_stages + 1)]
        self._out_features, self._out_indices = resolve_out_features_out_indices(
            out_features, out_indices, self.stage_names)

        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(
                    f"`num_labels`={num_labels} disagrees with `id2label` ({len(id2label)} labels)")
            num_labels = len(id2label)
        if num_labels is None:
            num_labels = 2  # transformers' default
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
            raise ValueError(f"`num_labels` must be an int >= 0, got {num_labels!r}")
        self.id2label = id2label if id2label is not None else {i: f"LABEL_{i}" for i in range(num_labels)}
        self.label2id = ({k: int(v) for k, v in label2id.items()} if label2id is not None
                         else {v: k for k, v in self.id2label.items()})
        # Keys transformers writes into config.json that do not change the architecture.
        self.extra = {k: v for k, v in kwargs.items() if k not in _IGNORED_KEYS}

    # --- stage selection -------------------------------------------------------------
    @property
    def out_features(self) -> List[str]:
        return list(self._out_features)

    @out_features.setter
    def out_features(self, out_features: Optional[Sequence[str]]) -> None:
        self._out_features, self._out_indices = resolve_out_features_out_indices(
            out_features, None, self.stage_names)

    @property
    def out_indices(self) -> List[int]:
        return list(self._out_indices)

    @out_indices.setter
    def out_indices(self, out_indices: Optional[Sequence[int]]) -> None:
        self._out_features, self._out_indices = resolve_out_features_out_indices(
            None, out_indices, self.stage_names)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def strides(self) -> List[int]:
        """Output stride of each entry of `stage_names` (stem, stage1, ...)."""
        return [self.patch_size] + [self.patch_size * 2 ** i for i in range(self.num_stages)]

    @property
    def channels(self) -> List[int]:
        """Channels of each entry of `stage_names` (the stem has stage1's width)."""
        return [self.hidden_sizes[0]] + list(self.hidden_sizes)

    @property
    def total_stride(self) -> int:
        return self.strides[-1]

    @property
    def version(self) -> int:
        return 2 if self.use_grn else 1

    # --- variants ------------------------------------------------------------------
    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> "ConvNextConfig":
        """A named variant ("tiny" ... "xlarge", "v2-atto" ... "v2-huge") with overrides."""
        args = copy.deepcopy(VARIANTS[variant_key(name)])
        args.update(overrides)
        return cls(**args)

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A dict that `from_dict` and transformers' ConvNext(V2)Config both read."""
        out = {
            "model_type": "convnextv2" if self.use_grn else "convnext",
            "architectures": self.extra.get("architectures"),
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "num_stages": self.num_stages,
            "hidden_sizes": list(self.hidden_sizes),
            "depths": list(self.depths),
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "drop_path_rate": self.drop_path_rate,
            "image_size": self.image_size,
            "out_features": self.out_features,
            "out_indices": self.out_indices,
            "stage_names": list(self.stage_names),
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "label2id": dict(self.label2id),
            "use_grn": self.use_grn,
        }
        if out["architectures"] is None:
            del out["architectures"]
        if not self.use_grn or self.layer_scale_init_value > 0:
            out["layer_scale_init_value"] = self.layer_scale_init_value
        return out

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides: Any) -> "ConvNextConfig":
        # Private keys are transformers' bookkeeping, except its backbone fields, which
        # some versions store only privately.
        args = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        for private in ("_out_features", "_out_indices"):
            if config_dict.get(private) is not None:
                args.setdefault(private[1:], config_dict[private])
        args.update(overrides)
        model_type = args.pop("model_type", None)
        if model_type not in (None, "convnext", "convnextv2"):
            raise ValueError(f"config has model_type={model_type!r}; expected 'convnext' or 'convnextv2'")
        if model_type == "convnextv2":
            args.setdefault("use_grn", True)
            # transformers' ConvNextV2Config has no layer scale.
            args.setdefault("layer_scale_init_value", 0.0)
        args.pop("stage_names", None)
        # A new label count replaces the stored labels unless new labels come with it.
        if "num_labels" in overrides and "id2label" not in overrides:
            args.pop("id2label", None)
            args.pop("label2id", None)
        # A config.json may carry both, derived from each other; features are enough,
        # unless an override changes one of them.
        if "out_features" in overrides and "out_indices" not in overrides:
            args.pop("out_indices", None)
        elif "out_indices" in overrides and "out_features" not in overrides:
            args.pop("out_features", None)
        return cls(**args)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> str:
        from .io_utils import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike], **overrides: Any) -> "ConvNextConfig":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], **overrides: Any) -> "ConvNextConfig":
        path = os.path.join(directory, "config.json") if os.path.isdir(directory) else directory
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No config.json in {directory!r}")
        return cls.from_json_file(path, **overrides)

    def copy(self, **overrides: Any) -> "ConvNextConfig":
        args = self.to_dict()
        args["layer_scale_init_value"] = self.layer_scale_init_value
        args.update(self.extra)
        return type(self).from_dict(args, **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConvNextConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# Keys that transformers' config.json carries and that have no meaning here.
_IGNORED_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings",
}
