# COCO 2017 instances, read through pycocotools (polygon and RLE masks; crowd regions are
# left out of training targets and seen by COCOeval through the annotation file).
dataset_type = 'ConvNextCocoDataset'
data_root = 'data/coco/'
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='convnext_detection_collate'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        img_dir='train2017/',
        # multi-scale resizing is the detector's `min_size` (see the model config)
        transforms=[dict(type='RandomHorizontalFlip', prob=0.5)],
        filter_empty_gt=True))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='convnext_detection_collate'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        img_dir='val2017/',
        test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='ConvNextCocoMetric',
    data_root=data_root,
    ann_file='annotations/instances_val2017.json',
    metric=['bbox', 'segm'])
test_evaluator = val_evaluator
