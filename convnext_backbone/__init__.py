"""convnext-backbone: ConvNeXt V1/V2 backbones for detection and segmentation.

The core (this package's top level) needs only torch; integrations live in
`convnext_backbone.mmseg` and `convnext_backbone.torchvision`.
"""
from .configuration import SUPPORTED_ACTIVATIONS, VARIANTS, ConvNextConfig
from .modeling import (ConvNextBackbone, ConvNextForImageClassification, ConvNextModel,
                       ConvNextPreTrainedModel, ShapeSpec)
from .outputs import (BackboneOutput, BaseModelOutputWithPoolingAndNoAttention,
                      ImageClassifierOutputWithNoAttention)
from .stage_selection import resolve_out_features_out_indices

__version__ = "0.1.0"

__all__ = [
    "ConvNextConfig", "VARIANTS", "SUPPORTED_ACTIVATIONS", "ConvNextBackbone", "ConvNextModel",
    "ConvNextForImageClassification", "ConvNextPreTrainedModel", "ShapeSpec", "BackboneOutput",
    "BaseModelOutputWithPoolingAndNoAttention", "ImageClassifierOutputWithNoAttention",
    "resolve_out_features_out_indices", "ConvNextImageProcessor", "ConvNextFeatureExtractor",
    "load_checkpoint", "convert_state_dict", "detect_format",
]


def __getattr__(name):
    # The image processor needs numpy/PIL and the checkpoint code safetensors: import lazily
    # so `import convnext_backbone` stays torch-only.
    if name in ("ConvNextImageProcessor", "ConvNextFeatureExtractor"):
        from . import image_processing
        return getattr(image_processing, name)
    if name in ("load_checkpoint", "convert_state_dict", "detect_format"):
        from . import checkpoints
        return getattr(checkpoints, name)
    raise AttributeError(f"module 'convnext_backbone' has no attribute {name!r}")
