# Mask R-CNN + FPN on a ConvNeXt trunk (arXiv 2201.03545, Sec. 4; official
# object_detection configs), built by torchvision: `convnext_backbone.torchvision.
# maskrcnn_convnext_fpn` wrapped in the mmengine model `TorchvisionDetector`.
# The import registers the model, dataset, metric and the layer-decay constructor in
# mmengine's root registries (default_scope None) and makes resume safe on torch >= 2.6.
custom_imports = dict(imports=['convnext_backbone.detection'], allow_failed_imports=False)
default_scope = None
model = dict(
    type='TorchvisionDetector',
    builder='maskrcnn_convnext_fpn',
    arch_or_config='tiny',
    num_classes=81,  # 80 COCO categories (contiguous labels 1..80) + background
    checkpoint=None,  # ImageNet weights, any supported format (official, timm, HF, ...)
    trainable_stages=4,
    drop_path_rate=0.4,  # T 0.4, S 0.6, B 0.7 (official COCO configs)
    # The paper's multi-scale training: short side 480..800 (step 32), long side <= 1333;
    # torchvision resizes inside the detector, so predictions come back in image coordinates.
    min_size=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
    max_size=1333)
