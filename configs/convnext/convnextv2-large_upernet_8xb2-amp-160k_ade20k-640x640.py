# UperNet + ConvNeXt V2-large (FCMAE + IN-22k pretrained), ADE20K 640x640, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): ConvNeXt V2 (arXiv 2301.00808) reports UperNet results for its FCMAE models; the recipe here is ConvNeXt V1's.
# Same recipe as convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py; V2 backbone (GRN in the MLP, no layer scale).
_base_ = './convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py'
pretrained = 'checkpoints/convnextv2_large_22k_224_ema.pt'
model = dict(
    backbone=dict(arch='v2-large', layer_scale_init_value=0.0,
                  init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768))
