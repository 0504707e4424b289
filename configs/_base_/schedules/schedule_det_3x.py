# 3x COCO schedule (36 epochs, LR x0.1 after epochs 27 and 33), the paper's main setting.
_base_ = ['./schedule_det_1x.py']
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=36, milestones=[27, 33], gamma=0.1),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=36, val_interval=1)
