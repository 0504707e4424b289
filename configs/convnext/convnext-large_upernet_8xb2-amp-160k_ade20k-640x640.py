# UperNet + ConvNeXt-large (IN-22k pretrained), ADE20K 640x640, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): 53.2 / 53.7 mIoU, 235M params, 2458 GFLOPs.
# Same recipe as convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py; only the backbone size differs.
_base_ = './convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py'
pretrained = 'checkpoints/convnext_large_22k_224.pth'
model = dict(
    backbone=dict(arch='large', init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768))
