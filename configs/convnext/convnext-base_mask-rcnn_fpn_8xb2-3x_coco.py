# Mask R-CNN + ConvNeXt-B, COCO 3x: AdamW 1e-4, wd 0.05, drop path 0.7 (official
# COCO value for B), layer-wise LR decay over num_layers 12 (the official numbering of
# the 27-block third stage). The official repo publishes no Mask R-CNN B recipe; the
# decay rate 0.95 is the Mask R-CNN T one. Set model.checkpoint to ImageNet weights.
_base_ = [
    '../_base_/models/maskrcnn_convnext_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_det_3x.py',
]
model = dict(arch_or_config='base', drop_path_rate=0.7)
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=12))
