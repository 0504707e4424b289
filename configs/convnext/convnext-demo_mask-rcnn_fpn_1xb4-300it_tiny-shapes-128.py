# A small ConvNeXt Mask R-CNN that learns the tiny COCO-format shapes dataset
# (tools/make_tiny_coco.py) on a CPU in minutes (tools/demo_detection.py, tests). Same
# model family and recipe as the COCO configs (AdamW, layer-wise LR decay, warm-up then
# step decay), scaled down: a 5-block ConvNeXt, narrow FPN and heads, 128-pixel images.
# Run it: `python tools/make_tiny_coco.py data/tiny_coco && python tools/train.py THIS_CONFIG`
# (or `python tools/demo_detection.py`, which also evaluates and draws predictions).
_base_ = [
    '../_base_/models/maskrcnn_convnext_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_det_1x.py',
]
data_root = 'data/tiny_coco/'
model = dict(
    arch_or_config=dict(_delete_=True, depths=[1, 1, 2, 1], hidden_sizes=[24, 48, 96, 192],
                        layer_scale_init_value=1.0),
    num_classes=4,  # square, circle, triangle + background
    drop_path_rate=0.0,
    min_size=128,
    max_size=128,
    out_channels=64,
    box_representation_size=256,
    mask_head_channels=[64, 64],
    anchor_sizes=[16, 32, 64, 128, 256],
    rpn_batch_size_per_image=128,
    rpn_pre_nms_top_n_train=500,
    rpn_post_nms_top_n_train=250,
    rpn_pre_nms_top_n_test=250,
    rpn_post_nms_top_n_test=100,
    box_batch_size_per_image=64,
    box_detections_per_img=20)
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/instances_train.json',
                 img_dir='train/'))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/instances_val.json',
                 img_dir='val/'))
test_dataloader = val_dataloader
val_evaluator = dict(data_root=data_root, ann_file='annotations/instances_val.json')
test_evaluator = val_evaluator
optim_wrapper = dict(
    optimizer=dict(lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=300, milestones=[225], gamma=0.1),
]
# 300 iterations: box AP ~0.76-0.83, mask AP ~0.81-0.83 on the 40 validation images
# (tools/demo_detection.py, seeds 0 and 1), ~2.5 minutes on 2 CPU cores.
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=300, val_interval=300)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
