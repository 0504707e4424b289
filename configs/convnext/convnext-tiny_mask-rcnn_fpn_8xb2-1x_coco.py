# Mask R-CNN + ConvNeXt-T, COCO 1x: AdamW 1e-4, wd 0.05, layer-wise LR decay 0.95
# (num_layers 6), drop path 0.4, multi-scale 480..800 / 1333, batch 16 (8 GPUs x 2).
# Paper (3x): 46.2 box AP / 41.7 mask AP, 48M parameters. Set model.checkpoint to the
# ImageNet-1k ConvNeXt-T weights (any supported format). --amp for mixed precision.
_base_ = [
    '../_base_/models/maskrcnn_convnext_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_det_1x.py',
]
model = dict(arch_or_config='tiny', drop_path_rate=0.4)
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6))
