# A small ConvNeXt + UperNet that learns the tiny ADE20K-format dataset on a CPU in minutes
# (tools/demo_segmentation.py, tests). Same model family and recipe as the paper's configs
# (AdamW, stage-wise LR decay, warm-up + poly), scaled down. The tiny dataset keeps ADE20K's
# 150-class labels but only uses its first five classes, so the heads predict those five
# (150-way logits at full resolution would cost most of the CPU time); the metric is still
# mmseg's IoUMetric over the ADE20K class list.
_base_ = [
    '../_base_/models/upernet_convnext.py', '../_base_/datasets/tiny_ade20k.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        depths=[1, 1, 2, 1],  # official-style arguments: they replace `arch`
        dims=[16, 32, 64, 128],
        drop_path_rate=0.0,
        layer_scale_init_value=1.0),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32, dropout_ratio=0.0,
                     num_classes=5, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, dropout_ratio=0.0, num_classes=5,
                        norm_cfg=norm_cfg))
optim_wrapper = dict(
    optimizer=dict(lr=4e-3, weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=50, end=1000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=1000, val_interval=250)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=250, max_keep_ckpts=2),
    visualization=dict(type='SegVisualizationHook', draw=False))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
