# UperNet + ConvNeXt-base (IN-22k pretrained), ADE20K 640x640, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): 52.6 / 53.1 mIoU, 122M params, 1828 GFLOPs.
_base_ = [
    '../_base_/models/upernet_convnext.py', '../_base_/datasets/ade20k_640x640.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
crop_size = (640, 640)
# IN-22k weights in any supported format (official, timm, transformers, torchvision, mmpretrain);
# download them first: nothing is fetched at run time. None trains from scratch.
pretrained = 'checkpoints/convnext_base_22k_224.pth'
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch='base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024], num_classes=150),
    auxiliary_head=dict(in_channels=512, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(426, 426)))
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=12))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
