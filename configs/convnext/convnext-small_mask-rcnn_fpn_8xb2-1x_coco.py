# Mask R-CNN + ConvNeXt-S, COCO 1x: AdamW 1e-4, wd 0.05, drop path 0.6 (official
# COCO value for S), layer-wise LR decay over num_layers 12 (the official numbering of
# the 27-block third stage). The official repo publishes no Mask R-CNN S recipe; the
# decay rate 0.95 is the Mask R-CNN T one. Set model.checkpoint to ImageNet weights.
_base_ = [
    '../_base_/models/maskrcnn_convnext_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_det_1x.py',
]
model = dict(arch_or_config='small', drop_path_rate=0.6)
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=12))
