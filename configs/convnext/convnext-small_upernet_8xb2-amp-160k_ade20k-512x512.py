# UperNet + ConvNeXt-small (IN-1k pretrained), ADE20K 512x512, 160k iterations, batch 16.
# Paper (single-scale / multi-scale+flip): 48.7 / 49.6 mIoU, 82M params, 1027 GFLOPs.
# Same recipe as convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py; only the backbone size differs.
_base_ = './convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'
pretrained = 'checkpoints/convnext_small_1k_224.pth'
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.4,
                  init_cfg=dict(checkpoint=pretrained)))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
