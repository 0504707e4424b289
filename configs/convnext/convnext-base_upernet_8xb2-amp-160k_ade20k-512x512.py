# UperNet + ConvNeXt-base (IN-1k pretrained), ADE20K 512x512, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): 49.1 / 49.9 mIoU, 122M params, 1170 GFLOPs.
# Same recipe as convnext-small_upernet_8xb2-amp-160k_ade20k-512x512.py; only the backbone size differs.
_base_ = './convnext-small_upernet_8xb2-amp-160k_ade20k-512x512.py'
pretrained = 'checkpoints/convnext_base_1k_224.pth'
model = dict(
    backbone=dict(arch='base', init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
