# UperNet + ConvNeXt V2-huge (FCMAE + IN-22k pretrained), ADE20K 640x640, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): ConvNeXt V2 (arXiv 2301.00808) reports UperNet results for its FCMAE models; the recipe here is ConvNeXt V1's.
# Same recipe as convnextv2-large_upernet_8xb2-amp-160k_ade20k-640x640.py; only the backbone size differs.
_base_ = './convnextv2-large_upernet_8xb2-amp-160k_ade20k-640x640.py'
pretrained = 'checkpoints/convnextv2_huge_22k_512_ema.pt'
model = dict(
    backbone=dict(arch='v2-huge', init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[352, 704, 1408, 2816]),
    auxiliary_head=dict(in_channels=1408))
