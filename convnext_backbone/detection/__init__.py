"""COCO detection with torchvision detectors, run by mmengine.

Importing this package registers, in mmengine's root registries (so configs find them
with `default_scope=None` and from any downstream scope):

- `DATASETS`: `ConvNextCocoDataset` (`CocoInstanceDataset`)
- `FUNCTIONS`: `convnext_detection_collate` (`detection_collate`)
- `MODELS`: `TorchvisionDetector`
- `METRICS`: `ConvNextCocoMetric` (`CocoMetric`)
- `OPTIM_WRAPPER_CONSTRUCTORS`: `DetectorLayerDecayOptimizerConstructor`

Configs load it with `custom_imports=dict(imports=['convnext_backbone.detection'],
allow_failed_imports=False)`. It also enables safe resume and atomic checkpoints
(`convnext_backbone.mmengine_utils.setup_mmengine`).
"""
from __future__ import annotations

try:
    import mmengine  # noqa: F401
    import pycocotools  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("convnext_backbone.detection needs mmengine and pycocotools: "
                      "pip install 'convnext-backbone[detection]'") from exc

from mmengine.registry import DATASETS, FUNCTIONS, METRICS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS

from ..mmengine_utils import setup_mmengine
from .dataset import (CocoInstanceDataset, Compose, RandomHorizontalFlip, build_transforms,
                      detection_collate)
from .metric import CocoMetric, predictions_to_coco
from .model import TRUNK_PREFIX, DetectorLayerDecayOptimizerConstructor, TorchvisionDetector

__all__ = ["CocoInstanceDataset", "Compose", "RandomHorizontalFlip", "build_transforms",
           "detection_collate", "CocoMetric", "predictions_to_coco", "TorchvisionDetector",
           "DetectorLayerDecayOptimizerConstructor", "TRUNK_PREFIX"]


def _register() -> None:
    # force=True keeps re-imports (e.g. from spawned workers) idempotent.
    DATASETS.register_module(name="ConvNextCocoDataset", module=CocoInstanceDataset, force=True)
    FUNCTIONS.register_module(name="convnext_detection_collate", module=detection_collate, force=True)
    MODELS.register_module(name="TorchvisionDetector", module=TorchvisionDetector, force=True)
    METRICS.register_module(name="ConvNextCocoMetric", module=CocoMetric, force=True)
    OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="DetectorLayerDecayOptimizerConstructor",
                                               module=DetectorLayerDecayOptimizerConstructor,
                                               force=True)


_register()
setup_mmengine()
