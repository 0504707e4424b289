# UperNet + ConvNeXt V2-base (FCMAE + IN-1k pretrained), ADE20K 512x512, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): ConvNeXt V2 (arXiv 2301.00808) reports UperNet results for its FCMAE models; the recipe here is ConvNeXt V1's.
# Same recipe as convnextv2-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py; only the backbone size differs.
_base_ = './convnextv2-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'
pretrained = 'checkpoints/convnextv2_base_1k_224_ema.pt'
model = dict(
    backbone=dict(arch='v2-base', drop_path_rate=0.4,
                  init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
