"""Output containers shaped like transformers' ModelOutput: attribute, key and index
access, `None` fields skipped in tuples. A dict subclass, so torch.fx and torch.compile
treat it as a plain dict."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Optional, Tuple

import torch

__all__ = ["ModelOutput", "BackboneOutput", "BaseModelOutputWithPoolingAndNoAttention",
           "ImageClassifierOutputWithNoAttention", "BaseModelOutputWithNoAttention"]


class ModelOutput(OrderedDict):
    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        # Keep attribute and key access in step, as transformers' ModelOutput does.
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(dict.__getitem__(self, k) for k in self.keys())


@dataclass
class BackboneOutput(ModelOutput):
    feature_maps: Tuple[torch.Tensor, ...] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class BaseModelOutputWithNoAttention(ModelOutput):
    last_hidden_state: torch.Tensor = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: torch.Tensor = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class ImageClassifierOutputWithNoAttention(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
