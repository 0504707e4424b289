# 1x COCO schedule (12 epochs, LR x0.1 after epochs 8 and 11) with the paper's optimiser:
# AdamW lr 1e-4, weight decay 0.05, layer-wise LR decay 0.95 (num_layers 6 for ConvNeXt-T),
# 500 linear warm-up iterations; batch 16 (8 GPUs x 2 images). Also the detection runtime
# (hooks, environment), kept apart from the mmseg runtime, which is mmseg-scoped.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='DetectorLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=12, milestones=[8, 11], gamma=0.1),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# mmengine's linear scaling rule is off by default; enable with --auto-scale-lr if the
# training script offers it.
auto_scale_lr = dict(enable=False, base_batch_size=16)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))  # tools/train.py switches to gloo where there is no GPU
log_processor = dict(by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
