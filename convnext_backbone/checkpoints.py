"""Checkpoint formats: loading, detection, conversion, `from_pretrained`/`save_pretrained`.

The package's canonical layout is the official facebookresearch one
(`downsample_layers.*`, `stages.{i}.{j}.dwconv|norm|pwconv1|pwconv2|gamma|grn.gamma|grn.beta`)
plus per-stage out norms `norm0..norm{n-1}` and `norm_stem`, the pooled final norm `norm`
and the classifier `head.*`. Five formats convert to and from it with pure functions:

============  ==========================================================================
official      facebookresearch ConvNeXt / ConvNeXt-V2: `{'model': ...}` classification,
              `backbone.`-prefixed det/seg checkpoints (decode heads etc. are ignored)
mmpretrain    `backbone.stages.0.0.depthwise_conv`, `pointwise_conv1/2`, `head.fc`
transformers  `ConvNextModel`/`ConvNextBackbone` (`embeddings.*`, `encoder.stages.*`,
              `hidden_states_norms.*`), classifier with a `convnext.`/`convnextv2.` prefix
timm          `stem.0`, `stages.{i}.blocks.{j}.conv_dw`, `mlp.fc1`, `head.fc`; also
              `features_only` keys (`stem_0`, `stages_0`)
torchvision   `features.{2i+1}.{j}.block.*`, `features.{2i}` downsamples, `classifier.*`
============  ==========================================================================

The stem's out norm (`norm_stem`) has no official/mmpretrain name; those layouts keep it as
`norm_stem` (an extension), timm and torchvision have no out norms at all
(`from_canonical(..., drop_unsupported=True)` leaves them out).

Loading never unpickles code: safetensors or `torch.load(weights_only=True)` only.
This module imports torch and the standard library; safetensors is imported when used.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch

from .configuration import ConvNextConfig

__all__ = [
    "FORMATS", "UnsafeCheckpointError", "CheckpointMismatchError", "ConversionReport",
    "LoadReport", "load_checkpoint", "unwrap_state_dict", "detect_format", "to_canonical",
    "from_canonical", "convert_state_dict", "infer_config", "load_into", "load_pretrained",
    "save_pretrained", "canonical_state_dict", "save_state_dict",
]

logger = logging.getLogger(__name__)

FORMATS = ("official", "mmpretrain", "transformers", "timm", "torchvision")

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


class UnsafeCheckpointError(ValueError):
    """A pickle that needs code (classes/functions beyond tensors and containers) to load."""


class CheckpointMismatchError(RuntimeError):
    """Strict loading found missing, unexpected or wrongly shaped tensors."""

    def __init__(self, message: str, report: "LoadReport") -> None:
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
_WRAPPER_KEYS = ("model", "state_dict", "module")


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < os.path.getsize(path)


def unwrap_state_dict(obj: Any) -> StateDict:
    """The flat `{name: tensor}` inside a checkpoint object.

    Unwraps `{'model': ...}` (official), `{'state_dict': ...}` (mmengine/lightning),
    `{'module': ...}` (deepspeed) and `{'model_ema': ...}` (only when no 'model'), and
    strips a DDP `module.` prefix.

    Args:
        obj: what `torch.load`/safetensors returned.
    """
    for _ in range(3):  # nested wrappers, e.g. {'state_dict': {'model': ...}}
        if not isinstance(obj, Mapping):
            raise ValueError(f"A checkpoint must be a dict of tensors, got {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None and isinstance(obj.get("model_ema"), Mapping):
            inner = obj["model_ema"]
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"No tensors found in the checkpoint; top-level keys: {list(obj)[:10]}. "
            f"Expected a state dict, or one wrapped as {{'model'|'state_dict'|'module'|'model_ema': ...}}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# Data-only globals that training frameworks put next to the weights (numpy scalars and
# arrays in `meta`): rebuilding them runs no user code, so they are allow-listed. Anything
# else (e.g. `builtins.getattr`, arbitrary classes) is refused.
_DATA_ONLY_GLOBALS = re.compile(
    r"^numpy\.(_core|core)\.multiarray\.(_reconstruct|scalar)$|^numpy\.(ndarray|dtype)$"
    r"|^numpy\.dtypes\.\w+DType$")


def _import_global(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _load_with_numpy_metadata(path: str, map_location: Any, error: Exception) -> Any:
    """Retries a weights-only load that failed only because of numpy metadata; otherwise
    raises UnsafeCheckpointError naming what the pickle references."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint (legacy format): no list to check
        names = None
    if names and all(_DATA_ONLY_GLOBALS.match(n) for n in names):
        try:
            allowed = [_import_global(n) for n in names]
        except (ImportError, AttributeError):
            allowed = None
        if allowed is not None:
            # numpy's per-dtype classes (numpy.dtypes.Float64DType, ...) are only reached
            # while building a dtype, so they are not in the list above.
            import numpy

            allowed += [getattr(numpy.dtypes, n) for n in dir(getattr(numpy, "dtypes", None))
                        if n.endswith("DType") and isinstance(getattr(numpy.dtypes, n), type)]
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as retry_error:
                error = retry_error
    refs = [n for n in names if not _DATA_ONLY_GLOBALS.match(n)] if names else []
    if refs:
        detail = f" It references: {', '.join(refs[:8])}."
    else:
        # torch's message starts with boilerplate; the line naming what was refused is inside.
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
        named = [ln for ln in lines if re.search(r"GLOBAL|Unsupported|getattr\(|not allowed", ln)]
        detail = " " + (named[0] if named else lines[0] if lines else "").rstrip(".") + "."
    raise UnsafeCheckpointError(
        f"Refusing to load {path!r}: it is a pickle that needs code to load, and loading "
        f"it would run that code.{detail} Only tensors, plain containers and numpy data are "
        f"accepted (torch.load(weights_only=True)). If you trust the file, extract the weights "
        f"once in a trusted environment, e.g. `sd = torch.load(path, weights_only=False); "
        f"torch.save(sd['model'] if 'model' in sd else sd['state_dict'], 'clean.pth')`, or save "
        f"them with safetensors.") from None


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> StateDict:
    """Reads a checkpoint file safely and returns its flat state dict.

    Args:
        path: a `.safetensors` file or a torch pickle (`.pth`, `.pt`, `.bin`, `.ckpt`).
        map_location: device the tensors are loaded onto.

    Raises:
        FileNotFoundError: `path` does not exist.
        UnsafeCheckpointError: the pickle needs code to load (never run here).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path!r} is a directory; use `Model.from_pretrained(directory)` or pass the "
            f"weights file inside it (model.safetensors / pytorch_model.bin)")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        device = str(map_location) if not isinstance(map_location, str) else map_location
        return unwrap_state_dict(load_file(path, device=device))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        obj = _load_with_numpy_metadata(path, map_location, e)
    return unwrap_state_dict(obj)


# ---------------------------------------------------------------------------------------
# Key templates: canonical <-> each format
# ---------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{(s|b|t)(?:\*(\d+))?(?:\+(\d+))?\}")


class _Template:
    """A key pattern such as `features.{s*2+1}.{b}.block.0.{t}`: `s` stage, `b` block,
    `t` weight|bias; `s*a+c` is how a format numbers stages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields: List[Tuple[str, int, int]] = []
        parts, pos = [], 0
        for m in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[pos:m.start()]))
            name = m.group(1)
            parts.append(r"(weight|bias)" if name == "t" else r"(\d+)")
            self.fields.append((name, int(m.group(2) or 1), int(m.group(3) or 0)))
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("^" + "".join(parts) + "$")

    def match(self, key: str) -> Optional[Dict[str, Any]]:
        m = self.regex.match(key)
        if m is None:
            return None
        values: Dict[str, Any] = {}
        for (name, a, c), group in zip(self.fields, m.groups()):
            if name == "t":
                value: Any = group
            else:
                n = int(group) - c
                if n < 0 or n % a:
                    return None
                value = n // a
            if values.setdefault(name, value) != value:
                return None
        return values

    def format(self, values: Mapping[str, Any]) -> str:
        def sub(m: "re.Match[str]") -> str:
            if m.group(1) == "t":
                return values["t"]
            return str(values[m.group(1)] * int(m.group(2) or 1) + int(m.group(3) or 0))

        return _PLACEHOLDER.sub(sub, self.text)


# Canonical parts, in match order (the stem before the generic downsample patterns).
_CANONICAL = {
    "stem_conv": "downsample_layers.0.0.{t}",
    "stem_norm": "downsample_layers.0.1.{t}",
    "down_norm": "downsample_layers.{s}.0.{t}",
    "down_conv": "downsample_layers.{s}.1.{t}",
    "dwconv": "stages.{s}.{b}.dwconv.{t}",
    "norm": "stages.{s}.{b}.norm.{t}",
    "pwconv1": "stages.{s}.{b}.pwconv1.{t}",
    "pwconv2": "stages.{s}.{b}.pwconv2.{t}",
    "gamma": "stages.{s}.{b}.gamma",
    "grn_gamma": "stages.{s}.{b}.grn.gamma",
    "grn_beta": "stages.{s}.{b}.grn.beta",
    "out_norm": "norm{s}.{t}",
    "stem_out_norm": "norm_stem.{t}",
    "final_norm": "norm.{t}",
    "head": "head.{t}",
}

# Per format: part -> key inside the format's model prefix. None: the format has no such
# tensor. "@..." : a key at the checkpoint root (outside the prefix), e.g. transformers'
# `classifier` next to `convnext.*`.
_FORMAT_KEYS: Dict[str, Dict[str, Optional[str]]] = {
    "official": dict(_CANONICAL),
    "mmpretrain": {
        **_CANONICAL,
        "dwconv": "stages.{s}.{b}.depthwise_conv.{t}",
        "pwconv1": "stages.{s}.{b}.pointwise_conv1.{t}",
        "pwconv2": "stages.{s}.{b}.pointwise_conv2.{t}",
        # mmpretrain's classifier reuses the last stage's `norm{n-1}` as the pooled norm
        # (gap_before_final_norm); handled in code.
        "final_norm": None,
        "head": "@head.fc.{t}",
    },
    "transformers": {
        "stem_conv": "embeddings.patch_embeddings.{t}",
        "stem_norm": "embeddings.layernorm.{t}",
        "down_norm": "encoder.stages.{s}.downsampling_layer.0.{t}",
        "down_conv": "encoder.stages.{s}.downsampling_layer.1.{t}",
        "dwconv": "encoder.stages.{s}.layers.{b}.dwconv.{t}",
        "norm": "encoder.stages.{s}.layers.{b}.layernorm.{t}",
        "pwconv1": "encoder.stages.{s}.layers.{b}.pwconv1.{t}",
        "pwconv2": "encoder.stages.{s}.layers.{b}.pwconv2.{t}",
        "gamma": "encoder.stages.{s}.layers.{b}.layer_scale_parameter",
        "grn_gamma": "encoder.stages.{s}.layers.{b}.grn.weight",
        "grn_beta": "encoder.stages.{s}.layers.{b}.grn.bias",
        "out_norm": "hidden_states_norms.stage{s+1}.{t}",
        "stem_out_norm": "hidden_states_norms.stem.{t}",
        "final_norm": "layernorm.{t}",
        "head": "@classifier.{t}",
    },
    "timm": {
        "stem_conv": "stem.0.{t}",
        "stem_norm": "stem.1.{t}",
        "down_norm": "stages.{s}.downsample.0.{t}",
        "down_conv": "stages.{s}.downsample.1.{t}",
        "dwconv": "stages.{s}.blocks.{b}.conv_dw.{t}",
        "norm": "stages.{s}.blocks.{b}.norm.{t}",
        "pwconv1": "stages.{s}.blocks.{b}.mlp.fc1.{t}",
        "pwconv2": "stages.{s}.blocks.{b}.mlp.fc2.{t}",
        "gamma": "stages.{s}.blocks.{b}.gamma",
        "grn_gamma": "stages.{s}.blocks.{b}.mlp.grn.weight",
        "grn_beta": "stages.{s}.blocks.{b}.mlp.grn.bias",
        "out_norm": None,
        "stem_out_norm": None,
        "final_norm": "head.norm.{t}",
        "head": "head.fc.{t}",
    },
    "torchvision": {
        "stem_conv": "features.0.0.{t}",
        "stem_norm": "features.0.1.{t}",
        "down_norm": "features.{s*2}.0.{t}",
        "down_conv": "features.{s*2}.1.{t}",
        "dwconv": "features.{s*2+1}.{b}.block.0.{t}",
        "norm": "features.{s*2+1}.{b}.block.2.{t}",
        "pwconv1": "features.{s*2+1}.{b}.block.3.{t}",
        "pwconv2": "features.{s*2+1}.{b}.block.5.{t}",
        "gamma": "features.{s*2+1}.{b}.layer_scale",
        "grn_gamma": None,
        "grn_beta": None,
        "out_norm": None,
        "stem_out_norm": None,
        "final_norm": "classifier.0.{t}",
        "head": "classifier.2.{t}",
    },
}

_CANONICAL_T = {part: _Template(t) for part, t in _CANONICAL.items()}
_FORMAT_T = {
    fmt: {part: (_Template(t.lstrip("@")), t.startswith("@")) for part, t in keys.items() if t}
    for fmt, keys in _FORMAT_KEYS.items()
}

# Where each format's model starts: a key matching `(?P<p>prefix)<signature>`.
_SIGNATURES = {
    "mmpretrain": re.compile(r"^(?P<p>.*?)stages\.\d+\.\d+\.(depthwise_conv|pointwise_conv[12])\."),
    "official": re.compile(r"^(?P<p>.*?)(stages\.\d+\.\d+\.(dwconv|pwconv[12])\.|downsample_layers\.0\.0\.)"),
    "transformers": re.compile(r"^(?P<p>.*?)(embeddings\.patch_embeddings\.|encoder\.stages\.\d+\.layers\.\d+\.)"),
    "timm": re.compile(r"^(?P<p>.*?)(stem[._]0\.|stages[._]\d+\.blocks\.\d+\.conv_dw\.)"),
    "torchvision": re.compile(r"^(?P<p>.*?)(features\.0\.0\.|features\.\d+\.\d+\.block\.0\.)"),
}
# Whole-model checkpoints (det/seg) carry these next to the backbone; they are not ours.
_NON_BACKBONE_PARTS = {
    "decode_head", "auxiliary_head", "neck", "rpn_head", "roi_head", "bbox_head", "mask_head",
    "data_preprocessor", "fpn", "seg_head", "pixel_decoder", "panoptic_head", "semantic_head",
    "teacher", "criterion", "loss", "text_encoder", "decoder",
}
_OWN_CLASSIFIER_HEAD = _Template("classifier.{t}")
_TIMM_FEATURES_ONLY = re.compile(r"^(stem|stages)_(\d+)\.")


@dataclass
class ConversionReport:
    """What a conversion did with each key of the source."""

    src_format: str
    prefix: str = ""
    mapped: Dict[str, str] = field(default_factory=dict)
    ignored: List[str] = field(default_factory=list)
    unrecognised: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"format: {self.src_format}" + (f" (prefix {self.prefix!r})" if self.prefix else ""),
                 f"mapped: {len(self.mapped)} tensors",
                 f"ignored (not part of the backbone): {len(self.ignored)}"]
        if self.ignored:
            lines.append("  " + ", ".join(_abbreviate(self.ignored)))
        lines.append(f"unrecognised: {len(self.unrecognised)}")
        if self.unrecognised:
            lines.append("  " + ", ".join(self.unrecognised[:20]))
        return "\n".join(lines)


def _abbreviate(keys: Sequence[str]) -> List[str]:
    # "decode_head.* (12)" instead of every key.
    groups: Dict[str, int] = {}
    for k in keys:
        top = k.split(".", 1)[0]
        groups[top] = groups.get(top, 0) + 1
    return [f"{g}.* ({n})" for g, n in groups.items()]


def _as_state_dict(state_dict: Any) -> StateDict:
    if isinstance(state_dict, Mapping) and state_dict and \
            all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return dict(state_dict)
    return unwrap_state_dict(state_dict)


def _normalise_timm_features_only(key: str) -> str:
    return _TIMM_FEATURES_ONLY.sub(lambda m: f"{m.group(1)}.{m.group(2)}.", key)


def _detect(state_dict: Mapping[str, Any]) -> Tuple[Optional[str], str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {fmt: {} for fmt in FORMATS}
    for key in state_dict:
        for fmt in FORMATS:  # mmpretrain before official: both share downsample_layers
            m = _SIGNATURES[fmt].match(key)
            if m:
                prefixes = counts[fmt]
                prefixes[m.group("p")] = prefixes.get(m.group("p"), 0) + 1
                break
    totals = {fmt: sum(c.values()) for fmt, c in counts.items()}
    if totals["mmpretrain"]:
        # `downsample_layers.0.0` of an mmpretrain checkpoint also matched "official".
        totals["mmpretrain"] += totals.pop("official")
        counts["mmpretrain"] = {p: n + counts["official"].get(p, 0)
                                for p, n in counts["mmpretrain"].items()}
    best = max(totals, key=lambda f: totals[f])
    if totals[best] == 0:
        return None, "", totals
    prefixes = counts[best]
    return best, max(prefixes, key=lambda p: prefixes[p]), totals


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """Which of `FORMATS` a ConvNeXt state dict is in.

    Args:
        state_dict: a flat state dict (or a wrapped checkpoint, unwrapped first).

    Raises:
        ValueError: none of the formats' key layouts is present.
    """
    state_dict = _as_state_dict(state_dict)
    return _detected_or_raise(_detect(state_dict)[0], state_dict)


def _detected_or_raise(fmt: Optional[str], state_dict: Mapping[str, Any]) -> str:
    if fmt is None:
        raise ValueError(
            f"Unrecognised checkpoint layout: none of the formats {list(FORMATS)} matches. "
            f"Expected e.g. 'downsample_layers.0.0.weight' (official/mmpretrain), "
            f"'embeddings.patch_embeddings.weight' (transformers), 'stem.0.weight' (timm) or "
            f"'features.0.0.weight' (torchvision). Keys seen: {list(state_dict)[:8]}")
    return fmt


def _num_stages_in(keys: Iterable[str], template: _Template) -> int:
    stages = [v["s"] for v in (template.match(k) for k in keys) if v and "s" in v]
    return max(stages) + 1 if stages else 0


def _to_canonical_tensor(part: str, tensor: torch.Tensor) -> torch.Tensor:
    if part == "gamma":
        return tensor.reshape(-1)  # torchvision (C, 1, 1)
    if part in ("grn_gamma", "grn_beta"):
        return tensor.reshape(1, 1, 1, -1)  # timm / mmpretrain (4C,)
    if part in ("pwconv1", "pwconv2") and tensor.dim() == 4:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])  # 1x1 conv MLPs
    return tensor


def to_canonical(state_dict: Mapping[str, Any], src_format: Optional[str] = None,
                 progress: Optional[Callable[[int], None]] = None) -> Tuple[StateDict, ConversionReport]:
    """Converts a state dict in any of `FORMATS` to the canonical layout.

    Args:
        state_dict: the source tensors (a wrapped checkpoint is unwrapped).
        src_format: one of `FORMATS`; detected when None.
        progress: called with 1 after each source tensor (for progress bars).

    Returns:
        The canonical state dict and a report of mapped / ignored / unrecognised keys.
    """
    state_dict = _as_state_dict(state_dict)
    detected, prefix, _ = _detect(state_dict)
    if src_format is None:
        src_format = _detected_or_raise(detected, state_dict)
    elif src_format not in FORMATS:
        raise ValueError(f"Unknown format {src_format!r}; valid: {list(FORMATS)}")
    elif detected != src_format:
        prefix = ""  # an explicit format: keys are used as they are
    if src_format == "timm":
        state_dict = {_normalise_timm_features_only(k): v for k, v in state_dict.items()}
        prefix = _normalise_timm_features_only(prefix) if prefix else prefix

    templates = _FORMAT_T[src_format]
    report = ConversionReport(src_format=src_format, prefix=prefix)
    out: StateDict = {}
    mmpretrain_head = src_format == "mmpretrain" and any(
        templates["head"][0].match(k) for k in state_dict)
    last_stage = _num_stages_in((k[len(prefix):] for k in state_dict if k.startswith(prefix)),
                                templates["dwconv"][0]) - 1

    own_classifier = src_format == "official" and prefix == "convnext."
    for key, tensor in state_dict.items():
        found = None
        inner = key[len(prefix):] if key.startswith(prefix) else None
        for part, (template, at_root) in templates.items():
            candidate = key if at_root else inner
            if candidate is None:
                continue
            values = template.match(candidate)
            if values is not None:
                found = (part, values)
                break
        if found is None and own_classifier and inner is None:
            # This package's ConvNextForImageClassification.state_dict(): `convnext.*` and
            # its head as `classifier.*`.
            values = _OWN_CLASSIFIER_HEAD.match(key)
            found = ("head", values) if values is not None else None
        if found is None:
            top = key.split(".", 1)[0]
            if (inner is None and prefix) or top in _NON_BACKBONE_PARTS:
                report.ignored.append(key)
            else:
                report.unrecognised.append(key)
        else:
            part, values = found
            if part == "out_norm" and mmpretrain_head and values["s"] == last_stage:
                part = "final_norm"  # mmpretrain's pooled norm (gap_before_final_norm)
            new_key = _CANONICAL_T[part].format(values)
            if new_key in out:
                raise ValueError(f"Two tensors map to {new_key!r} (the second is {key!r}); "
                                 f"is src_format={src_format!r} right?")
            out[new_key] = _to_canonical_tensor(part, tensor)
            report.mapped[key] = new_key
        if progress is not None:
            progress(1)
    if not out:
        raise ValueError(f"No tensor of the checkpoint matched the {src_format!r} layout; "
                         f"keys seen: {list(state_dict)[:8]}")
    return out, report


def _canonical_part(key: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    for part, template in _CANONICAL_T.items():
        values = template.match(key)
        if values is not None:
            return part, values
    return None


def from_canonical(canonical: Mapping[str, torch.Tensor], dst_format: str, *,
                   prefix: Optional[str] = None, drop_unsupported: bool = False,
                   pointwise_as_conv: bool = False,
                   progress: Optional[Callable[[int], None]] = None) -> StateDict:
    """Converts a canonical state dict to `dst_format`.

    Args:
        canonical: tensors in the canonical layout (see module docstring).
        dst_format: one of `FORMATS`.
        prefix: model prefix to write; default per format: "" (official, timm,
            torchvision), "backbone." (mmpretrain), "convnext."/"convnextv2." for a
            transformers checkpoint with a classifier head, "" otherwise.
        drop_unsupported: drop tensors the format has no place for (e.g. out norms in
            timm/torchvision, GRN in torchvision) instead of raising.
        pointwise_as_conv: write MLP weights as 1x1 convs (timm's `conv_mlp=True`
            models, e.g. convnextv2_atto; mmpretrain's `linear_pw_conv=False`).
        progress: called with 1 after each tensor.

    Raises:
        ValueError: unknown format, a non-canonical key, or a tensor the format cannot
            hold (unless `drop_unsupported`).
    """
    if dst_format not in FORMATS:
        raise ValueError(f"Unknown format {dst_format!r}; valid: {list(FORMATS)}")
    templates = _FORMAT_T[dst_format]
    has_head = any(k.startswith("head.") for k in canonical)
    has_grn = any(".grn." in k for k in canonical)
    if prefix is None:
        prefix = {"mmpretrain": "backbone.",
                  "transformers": ("convnextv2." if has_grn else "convnext.") if has_head else ""
                  }.get(dst_format, "")
    last_stage = _num_stages_in(canonical, _CANONICAL_T["dwconv"]) - 1
    out: StateDict = {}
    unsupported, unknown = [], []
    for key, tensor in canonical.items():
        found = _canonical_part(key)
        if found is None:
            unknown.append(key)
            continue
        part, values = found
        if dst_format == "mmpretrain" and part == "final_norm":
            if f"norm{last_stage}.weight" in canonical:
                raise ValueError(
                    "mmpretrain stores the pooled final norm as the last stage's out norm "
                    f"`norm{last_stage}`, and this checkpoint has both; drop one of them first")
            part, values = "out_norm", {**values, "s": last_stage}
        if part not in templates:
            unsupported.append(key)
            continue
        template, at_root = templates[part]
        new_key = template.format(values)
        if not at_root:
            new_key = prefix + new_key
        if part == "gamma" and dst_format == "torchvision":
            tensor = tensor.reshape(-1, 1, 1)
        elif part in ("grn_gamma", "grn_beta") and dst_format in ("timm", "mmpretrain"):
            tensor = tensor.reshape(-1)
        elif part in ("pwconv1", "pwconv2") and pointwise_as_conv and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[new_key] = tensor
        if progress is not None:
            progress(1)
    if unknown:
        raise ValueError(f"Not canonical keys: {unknown[:10]}; convert with to_canonical() first")
    if unsupported and not drop_unsupported:
        raise ValueError(
            f"The {dst_format!r} format has no place for {len(unsupported)} tensors: "
            f"{unsupported[:10]}. Pass drop_unsupported=True (CLI: --drop-unsupported) to leave "
            f"them out")
    if unsupported:
        logger.warning("Dropped %d tensors the %s format cannot hold: %s", len(unsupported),
                       dst_format, unsupported)
    return out


def convert_state_dict(state_dict: Mapping[str, Any], dst_format: str,
                       src_format: Optional[str] = None, **kwargs: Any) -> StateDict:
    """`from_canonical(to_canonical(state_dict, src_format)[0], dst_format, **kwargs)`."""
    canonical, _ = to_canonical(state_dict, src_format)
    return from_canonical(canonical, dst_format, **kwargs)


# ---------------------------------------------------------------------------------------
# Architecture inference
# ---------------------------------------------------------------------------------------
def infer_config(canonical: Mapping[str, torch.Tensor], **overrides: Any) -> ConvNextConfig:
    """A `ConvNextConfig` matching the tensors of a canonical state dict.

    Reads depths, hidden sizes, V1/V2 (GRN), layer scale, patch size, input channels,
    head size (`num_labels`) and, from the out norms present, `out_features`.

    Args:
        canonical: a canonical state dict.
        **overrides: config fields set on top (e.g. `out_features`, `drop_path_rate`).
    """
    stem = canonical.get("downsample_layers.0.0.weight")
    if stem is None or stem.dim() != 4:
        raise ValueError("Cannot infer the architecture: no stem conv "
                         "'downsample_layers.0.0.weight' in the (canonical) state dict")
    blocks: Dict[int, set] = {}
    for key in canonical:
        values = _CANONICAL_T["dwconv"].match(key)
        if values is not None and values["t"] == "weight":
            blocks.setdefault(values["s"], set()).add(values["b"])
    num_stages = len(blocks)
    if sorted(blocks) != list(range(num_stages)):
        raise ValueError(f"Stages found in the checkpoint are not contiguous: {sorted(blocks)}")
    depths = []
    for s in range(num_stages):
        if sorted(blocks[s]) != list(range(len(blocks[s]))):
            raise ValueError(f"Blocks of stage {s} are not contiguous: {sorted(blocks[s])}")
        depths.append(len(blocks[s]))
    hidden_sizes = [int(canonical[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in range(num_stages)]
    use_grn = any(k.endswith(".grn.gamma") for k in canonical)
    has_layer_scale = any(_CANONICAL_T["gamma"].match(k) for k in canonical)
    stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_stages + 1)]
    out_features = [n for n in stage_names
                    if f"{'norm_stem' if n == 'stem' else 'norm%d' % (int(n[5:]) - 1)}.weight" in canonical]
    args: Dict[str, Any] = dict(
        num_channels=int(stem.shape[1]), patch_size=int(stem.shape[-1]), num_stages=num_stages,
        hidden_sizes=hidden_sizes, depths=depths, use_grn=use_grn,
        layer_scale_init_value=1e-6 if has_layer_scale else 0.0,
        out_features=out_features or None)
    if "head.weight" in canonical:
        args["num_labels"] = int(canonical["head.weight"].shape[0])
    if "out_indices" in overrides and "out_features" not in overrides:
        args.pop("out_features")
    args.update(overrides)
    return ConvNextConfig(**args)


# ---------------------------------------------------------------------------------------
# Loading into a module
# ---------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What `load_into` did. Keys are the module's names (canonical for ignored ones)."""

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    ignored_keys: List[str] = field(default_factory=list)
    mismatched_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    source_format: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_shapes)

    def __str__(self) -> str:
        parts = [f"source format: {self.source_format}"]
        for name in ("missing_keys", "unexpected_keys", "ignored_keys"):
            parts.append(f"{name} ({len(getattr(self, name))}): {getattr(self, name)}")
        parts.append("mismatched_shapes: " + ", ".join(
            f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched_shapes))
        return "\n".join(parts)


# Canonical groups a module may legitimately not have (ignored, not unexpected).
_OPTIONAL_CANONICAL = re.compile(r"^(norm\d+|norm_stem|norm|head)\.")


def _module_to_canonical(model: torch.nn.Module, key: str) -> str:
    if getattr(model, "model_kind", None) == "classifier":
        if key.startswith("convnext."):
            return key[len("convnext."):]
        if key.startswith("classifier."):
            return "head." + key[len("classifier."):]
    return key


def canonical_state_dict(model: torch.nn.Module) -> StateDict:
    """The model's tensors under canonical names (what `save_pretrained` writes)."""
    return {_module_to_canonical(model, k): v for k, v in model.state_dict().items()}


def load_into(model: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
              src_format: Optional[str] = None) -> LoadReport:
    """Copies a checkpoint (any format) into one of this package's models.

    Out norms, the final norm or a head that the checkpoint has and the module has not
    are reported as ignored. A module tensor the checkpoint does not provide is never
    left at its random init silently: strict loading raises, non-strict loading logs the
    exact list and returns it in the report.

    Args:
        model: a ConvNextBackbone / ConvNextModel / ConvNextForImageClassification.
        state_dict: the checkpoint's tensors (any of `FORMATS`).
        strict: raise on missing, unexpected or mismatched tensors.
        src_format: the checkpoint's format; detected when None.

    Raises:
        CheckpointMismatchError: strict loading with missing/unexpected/mismatched keys.
    """
    return _load_canonical(model, *to_canonical(state_dict, src_format), strict=strict)


def _load_canonical(model: torch.nn.Module, canonical: StateDict, conversion: "ConversionReport",
                    strict: bool) -> LoadReport:
    """`load_into` after the conversion to canonical names."""
    report = LoadReport(source_format=conversion.src_format,
                        unexpected_keys=list(conversion.unrecognised),
                        ignored_keys=list(conversion.ignored))
    module_state = model.state_dict()
    to_load: StateDict = {}
    provided = set()
    for key, target in module_state.items():
        ckey = _module_to_canonical(model, key)
        if ckey not in canonical:
            report.missing_keys.append(key)
            continue
        provided.add(ckey)
        tensor = canonical[ckey]
        if tuple(tensor.shape) != tuple(target.shape):
            report.mismatched_shapes.append((key, tuple(tensor.shape), tuple(target.shape)))
            continue
        to_load[key] = tensor
    for ckey in canonical:
        if ckey not in provided:
            (report.ignored_keys if _OPTIONAL_CANONICAL.match(ckey) else report.unexpected_keys).append(ckey)
    # Mismatched tensors are also not loaded: they stay as initialised.
    not_loaded = report.missing_keys + [k for k, _, _ in report.mismatched_shapes]
    if strict and not report.ok:
        lines = [f"Error loading a checkpoint ({report.source_format} format) into "
                 f"{type(model).__name__}:"]
        if report.missing_keys:
            lines.append(f"  missing (would stay randomly initialised) {len(report.missing_keys)}: "
                         f"{report.missing_keys}")
        if report.unexpected_keys:
            lines.append(f"  unexpected {len(report.unexpected_keys)}: {report.unexpected_keys}")
        for key, ckpt, mod in report.mismatched_shapes:
            lines.append(f"  shape mismatch for {key}: checkpoint {list(ckpt)} vs model {list(mod)}")
        lines.append("Pass strict=False to load what matches and get these lists back in the "
                     "report (e.g. per-stage out norms an ImageNet checkpoint does not have, to "
                     "be trained from their initialisation).")
        raise CheckpointMismatchError("\n".join(lines), report)
    model.load_state_dict(to_load, strict=False)
    if not_loaded:
        logger.warning("%s: %d tensors not in the checkpoint keep their initialisation: %s",
                       type(model).__name__, len(not_loaded), not_loaded)
    if report.unexpected_keys:
        logger.warning("%s: %d unexpected tensors in the checkpoint were not used: %s",
                       type(model).__name__, len(report.unexpected_keys), report.unexpected_keys)
    if report.mismatched_shapes:
        logger.warning("%s: shape mismatches: %s", type(model).__name__, "; ".join(
            f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched_shapes))
    return report


# ---------------------------------------------------------------------------------------
# from_pretrained / save_pretrained
# ---------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Constructor arguments that are not config fields.
_CTOR_KWARGS = ("frozen_stages",)


def _find_weights(directory: str) -> str:
    for name in _WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(directory))
    hint = (" Sharded checkpoints (*.index.json) are not supported; merge them into one file."
            if any(n.endswith(".index.json") for n in present) else "")
    raise FileNotFoundError(f"No weights in {directory!r}: expected one of {list(_WEIGHT_FILES)}, "
                            f"found {present}.{hint}")


def load_pretrained(cls: type, path: PathLike, strict: bool = True,
                    map_location: Union[str, torch.device] = "cpu", **overrides: Any):
    """Builds `cls` from a directory or a single checkpoint file and loads its weights.

    Args:
        cls: ConvNextBackbone, ConvNextModel or ConvNextForImageClassification.
        path: a `save_pretrained` or transformers directory (`config.json` +
            `model.safetensors`/`pytorch_model.bin`), or one checkpoint file in any of
            `FORMATS` (the architecture is then inferred from the tensors).
        strict: see `load_into`.
        map_location: device the tensors are read onto.
        **overrides: config fields on top of the stored/inferred config (e.g.
            `out_features`, `drop_path_rate`), and `frozen_stages` for the backbone.

    Returns:
        The model, in eval mode, with `load_report` (a `LoadReport`) attached.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint file or directory at {path!r}")
    ctor_kwargs = {k: overrides.pop(k) for k in _CTOR_KWARGS if k in overrides}
    code = ConvNextConfig.__init__.__code__
    valid = set(code.co_varnames[1:code.co_argcount])
    unknown = sorted(set(overrides) - valid)
    if unknown:
        # A typo would otherwise be stored silently as an extra config attribute.
        raise ValueError(f"Unknown override(s) {unknown}; valid: ConvNextConfig fields "
                         f"{sorted(valid)} and {list(_CTOR_KWARGS)} (ConvNextBackbone)")
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
    weights_path = _find_weights(path) if os.path.isdir(path) else path
    state_dict = load_checkpoint(weights_path, map_location=map_location)
    canonical, conversion = to_canonical(state_dict)
    if config_path is not None and os.path.isfile(config_path):
        config = ConvNextConfig.from_json_file(config_path, **overrides)
    else:
        if conversion.src_format != "transformers":
            # The official/timm/torchvision/mmpretrain final norms use eps 1e-6.
            overrides.setdefault("layer_norm_eps", 1e-6)
        config = infer_config(canonical, **overrides)
    try:
        model = cls(config, **ctor_kwargs)
    except TypeError as e:
        raise ValueError(f"{cls.__name__} does not accept {sorted(ctor_kwargs)} ({e}); "
                         f"valid overrides are ConvNextConfig fields") from None
    report = _load_canonical(model, canonical, conversion, strict=strict)
    model.load_report = report
    return model.eval()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                    metadata: Optional[Dict[str, str]] = None, wrap: Optional[str] = None) -> None:
    """Writes tensors atomically: safetensors for `.safetensors`, else `torch.save`.

    Args:
        state_dict: the tensors.
        path: target file.
        metadata: safetensors header metadata.
        wrap: for torch files, store `{wrap: state_dict}` (e.g. "model" as the official
            checkpoints do).
    """
    from .io_utils import atomic_write

    path = os.fspath(path)
    # Contiguous, and a copy only where storage is shared (safetensors refuses that), so
    # peak memory does not double for large models.
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        tensors[k] = v
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))
    else:
        obj: Any = {wrap: tensors} if wrap else tensors
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_pretrained(model: torch.nn.Module, directory: PathLike,
                    safe_serialization: bool = True) -> str:
    """Writes `config.json` and `model.safetensors` (or `pytorch_model.bin`) with
    canonical keys into `directory`, each atomically.

    Args:
        model: one of this package's models.
        directory: created if needed.
        safe_serialization: safetensors (default) or a torch pickle.

    Returns:
        The directory.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    save_state_dict(canonical_state_dict(model), os.path.join(directory, name),
                    metadata={"layout": "convnext_backbone.canonical"})
    model.config.save_pretrained(directory)
    # A stale file of the other kind would be picked up first by _find_weights.
    other = os.path.join(directory, _WEIGHT_FILES[1] if safe_serialization else _WEIGHT_FILES[0])
    if os.path.exists(other):
        os.remove(other)
    return directory
