# UperNet + ConvNeXt V2-tiny (FCMAE + IN-1k pretrained), ADE20K 512x512, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): ConvNeXt V2 (arXiv 2301.00808) reports UperNet results for its FCMAE models; the recipe here is ConvNeXt V1's.
# Same recipe as convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py; V2 backbone (GRN in the MLP, no layer scale).
_base_ = './convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'
pretrained = 'checkpoints/convnextv2_tiny_1k_224_ema.pt'
model = dict(
    backbone=dict(arch='v2-tiny', layer_scale_init_value=0.0,
                  init_cfg=dict(checkpoint=pretrained)))
