# convnext-tiny_mask-rcnn_fpn_8xb2-3x_coco.py with automatic mixed precision (fp16 with
# dynamic loss scaling on GPU); the same as passing --amp to tools/train.py.
_base_ = ['./convnext-tiny_mask-rcnn_fpn_8xb2-3x_coco.py']
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
