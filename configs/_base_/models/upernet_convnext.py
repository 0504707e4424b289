# UperNet + ConvNeXt (arXiv 2201.03545, Sec. 4 / official semantic_segmentation configs).
# The backbone is convnext_backbone's `ConvNeXt`, registered in mmseg's MODELS by the import
# below; its parameter names follow the official layout, so official checkpoints load as they
# are and mmseg's LearningRateDecayOptimizerConstructor recognises the layers.
custom_imports = dict(imports=['convnext_backbone.mmseg'], allow_failed_imports=False)
# SyncBN as in the paper's 8-GPU runs; mmengine turns it into BN when not distributed.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ConvNeXt',
        arch='tiny',
        in_channels=3,
        out_indices=(0, 1, 2, 3),  # 0 = first stage (official / mmpretrain convention)
        drop_path_rate=0.3,
        layer_scale_init_value=1.0,
        frozen_stages=0,
        with_cp=False),
    decode_head=dict(
        type='UPerHead',
        in_channels=[96, 192, 384, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
