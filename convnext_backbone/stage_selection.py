"""Resolving `out_features` / `out_indices` against `stage_names`.

transformers' rules (utils/backbone_utils.py), without its holes: tuples and lists are
both accepted, an empty selection is rejected, out-of-range negative indices are
rejected cleanly, and every message lists what is valid.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

__all__ = ["resolve_out_features_out_indices", "normalize_indices"]


def _valid_indices(n: int) -> str:
    return f"{list(range(n))} (or negative, down to {-n})"


def normalize_indices(out_indices: Sequence[int], stage_names: Sequence[str],
                      name: str = "out_indices") -> List[int]:
    """Checks indices against `stage_names` and returns them as non-negative ints."""
    n = len(stage_names)
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, (list, tuple)):
        raise ValueError(f"`{name}` must be a list or tuple of ints, got {out_indices!r}; "
                         f"valid indices: {_valid_indices(n)} for stages {list(stage_names)}")
    if len(out_indices) == 0:
        raise ValueError(f"`{name}` must not be empty; valid indices: {_valid_indices(n)} "
                         f"for stages {list(stage_names)}")
    positive = []
    for idx in out_indices:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"`{name}` must contain ints, got {idx!r} in {list(out_indices)}")
        if not -n <= idx < n:
            raise ValueError(f"`{name}` {list(out_indices)}: index {idx} is out of range; "
                             f"valid indices: {_valid_indices(n)} for stages {list(stage_names)}")
        positive.append(idx % n)
    if len(set(positive)) != len(positive):
        raise ValueError(f"`{name}` {list(out_indices)} names a stage twice "
                         f"(as non-negative indices: {positive}); each stage may appear once")
    if positive != sorted(positive):
        raise ValueError(f"`{name}` {list(out_indices)} must be in stage order "
                         f"(as non-negative indices: {positive}, expected {sorted(positive)})")
    return positive


def _check_features(out_features: Sequence[str], stage_names: Sequence[str]) -> List[str]:
    if isinstance(out_features, (str, bytes)) or not isinstance(out_features, (list, tuple)):
        raise ValueError(f"`out_features` must be a list or tuple of stage names, got "
                         f"{out_features!r}; valid names: {list(stage_names)}")
    if len(out_features) == 0:
        raise ValueError(f"`out_features` must not be empty; valid names: {list(stage_names)}")
    for feat in out_features:
        if feat not in stage_names:
            raise ValueError(f"`out_features` {list(out_features)}: {feat!r} is not a stage; "
                             f"valid names: {list(stage_names)}")
    if len(set(out_features)) != len(out_features):
        raise ValueError(f"`out_features` {list(out_features)} names a stage twice; "
                         f"valid names: {list(stage_names)}")
    order = [stage_names.index(f) for f in out_features]
    if order != sorted(order):
        expected = [stage_names[i] for i in sorted(order)]
        raise ValueError(f"`out_features` {list(out_features)} must be in stage order, "
                         f"e.g. {expected}; stages are {list(stage_names)}")
    return list(out_features)


def resolve_out_features_out_indices(
    out_features: Optional[Sequence[str]],
    out_indices: Optional[Sequence[int]],
    stage_names: Sequence[str],
) -> Tuple[List[str], List[int]]:
    """Returns aligned `(out_features, out_indices)`; indices are non-negative.

    Neither given: the last stage. One given: the other is derived. Both given: they
    must name the same stages.
    """
    stage_names = list(stage_names)
    if out_features is None and out_indices is None:
        return [stage_names[-1]], [len(stage_names) - 1]
    if out_indices is None:
        features = _check_features(out_features, stage_names)
        return features, [stage_names.index(f) for f in features]
    indices = normalize_indices(out_indices, stage_names)
    if out_features is None:
        return [stage_names[i] for i in indices], indices
    features = _check_features(out_features, stage_names)
    if len(features) != len(indices):
        raise ValueError(f"`out_features` {features} and `out_indices` {list(out_indices)} "
                         f"must have the same length when both are given")
    if [stage_names[i] for i in indices] != features:
        raise ValueError(f"`out_features` {features} and `out_indices` {list(out_indices)} "
                         f"name different stages (the indices name "
                         f"{[stage_names[i] for i in indices]}); stages are {stage_names}")
    return features, indices
