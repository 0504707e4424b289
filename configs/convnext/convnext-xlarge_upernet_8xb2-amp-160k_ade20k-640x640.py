# UperNet + ConvNeXt-xlarge (IN-22k pretrained), ADE20K 640x640, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): 53.6 / 54.0 mIoU, 391M params, 3335 GFLOPs.
# Same recipe as convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py; only the backbone size differs.
_base_ = './convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py'
pretrained = 'checkpoints/convnext_xlarge_22k_224.pth'
model = dict(
    backbone=dict(arch='xlarge', init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))
