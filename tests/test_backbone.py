"""Shapes, gradients and behaviour of the core models; every variant through the same tests."""
import math

import pytest
import torch
import torch.nn.functional as F

from convnext_backbone import (VARIANTS, ConvNextBackbone, ConvNextConfig,
                               ConvNextForImageClassification, ConvNextModel)

ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]

# Published parameter counts with the 1000-class head (timm / the papers), in millions.
PUBLISHED_PARAMS_M = {
    "tiny": 28.59, "small": 50.22, "base": 88.59, "large": 197.77, "xlarge": 350.20,
    "v2-atto": 3.71, "v2-femto": 5.23, "v2-pico": 9.07, "v2-nano": 15.62, "v2-tiny": 28.64,
    "v2-base": 88.72, "v2-large": 197.96, "v2-huge": 660.29,
}
TIMM_NAMES = {name: ("convnextv2_" + name[3:] if name.startswith("v2-") else "convnext_" + name)
              for name in VARIANTS}


def _meta_param_count(module_fn):
    with torch.device("meta"):
        return sum(p.numel() for p in module_fn().parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_published_and_timm(variant):
    cfg = ConvNextConfig.from_variant(variant, num_labels=1000)
    ours = _meta_param_count(lambda: ConvNextForImageClassification(cfg))
    assert round(ours / 1e6, 2) == PUBLISHED_PARAMS_M[variant]
    timm = pytest.importorskip("timm")
    assert ours == _meta_param_count(lambda: timm.create_model(TIMM_NAMES[variant], pretrained=False))


def test_convnext_tiny_has_28_6m_parameters():
    model = ConvNextForImageClassification(ConvNextConfig(num_labels=1000))
    assert model.num_parameters() == 28_589_128


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_shapes_and_gradients(variant):
    torch.manual_seed(0)
    # Real widths; one block per stage keeps the largest variants affordable on CPU.
    cfg = ConvNextConfig.from_variant(variant, depths=[1, 1, 1, 1], out_features=ALL_STAGES)
    model = ConvNextBackbone(cfg)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    widths = VARIANTS[variant]["hidden_sizes"]
    expected = [(2, widths[0], 16, 24), (2, widths[0], 16, 24), (2, widths[1], 8, 12),
                (2, widths[2], 4, 6), (2, widths[3], 2, 3)]
    assert [tuple(f.shape) for f in out.feature_maps] == expected
    assert model.channels == [widths[0]] + widths and model.strides == [4, 4, 8, 16, 32]
    sum(f.float().pow(2).mean() for f in out.feature_maps).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    # The normalised maps are zero-mean / unit-variance over channels at init.
    stage4 = out.feature_maps[-1]
    assert torch.allclose(stage4.mean(1), torch.zeros(()), atol=1e-4)
    assert torch.allclose(stage4.var(1, unbiased=False), torch.ones(()), atol=1e-2)


def test_output_shape_and_out_norms(tiny_config):
    cfg = tiny_config.copy(out_features=["stem", "stage2", "stage4"])
    model = ConvNextBackbone(cfg)
    assert model.output_shape() == {"stem": (8, 4), "stage2": (16, 8), "stage4": (64, 32)}
    assert model.output_shape()["stage2"].stride == 8
    norms = sorted(n.split(".")[0] for n, _ in model.named_parameters() if n.startswith("norm"))
    assert norms == ["norm1", "norm1", "norm3", "norm3", "norm_stem", "norm_stem"]
    assert model.out_features == ["stem", "stage2", "stage4"] and model.out_indices == [0, 2, 4]


def test_feature_maps_are_out_norms_of_hidden_states(tiny_config):
    model = ConvNextBackbone(tiny_config.copy(out_indices=[0, 1, 2, 3, 4])).eval()
    for p in model.parameters():  # non-trivial norms, so a swapped norm would show
        torch.nn.init.normal_(p, 0.5, 0.2)
    x = torch.randn(1, 3, 64, 64)
    out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    norm_names = ["norm_stem", "norm0", "norm1", "norm2", "norm3"]  # the official layout
    for norm_name, fmap, hidden in zip(norm_names, out.feature_maps, out.hidden_states):
        norm = getattr(model, norm_name)
        ref = F.layer_norm(hidden.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                           1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(fmap, ref)
    # stem output = stem conv + LN, before stage1's blocks (same shape as stage1's output)
    torch.testing.assert_close(out.hidden_states[0], model.downsample_layers[0](x))


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (33, 250), (31, 31), (1, 1)])
def test_any_input_size_is_padded_then_cropped(tiny_config, size):
    model = ConvNextBackbone(tiny_config.copy(out_features=ALL_STAGES)).eval()
    h, w = size
    x = torch.randn(1, 3, h, w)
    out = model(x, output_hidden_states=True)
    for fmap, stride in zip(out.feature_maps, model.strides):
        assert fmap.shape[-2:] == (math.ceil(h / stride), math.ceil(w / stride))
    # Same as zero-padding to the total stride by hand, then cropping.
    padded = F.pad(x, (0, -w % 32, 0, -h % 32))
    ref = model(padded, output_hidden_states=True)
    for ours, full, stride in zip(out.hidden_states, ref.hidden_states, model.strides):
        torch.testing.assert_close(ours, full[..., :math.ceil(h / stride), :math.ceil(w / stride)])


def test_channels_last_input_matches(tiny_config):
    model = ConvNextBackbone(tiny_config.copy(out_features=ALL_STAGES)).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x).feature_maps
    out = model(x.contiguous(memory_format=torch.channels_last)).feature_maps
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last)).feature_maps
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(3, 64, 64), ValueError, r"4-D \(batch, channels, height, width\)"),
    (torch.randn(1, 1, 3, 64, 64), ValueError, "4-D"),
    (torch.randn(1, 4, 64, 64), ValueError, "expects num_channels=3"),
    (torch.randn(1, 64, 64, 3), ValueError, "NHWC"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating-point"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.int64), TypeError, "floating-point"),
])
def test_bad_input_errors(tiny_config, x, error, message):
    model = ConvNextBackbone(tiny_config)
    with pytest.raises(error, match=message):
        model(x)


def test_drop_path_schedule_is_linear_over_all_blocks():
    cfg = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 4, 2], drop_path_rate=0.3)
    model = ConvNextBackbone(cfg)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.stages for b in stage]
    expected = torch.linspace(0, 0.3, 10).tolist()
    assert rates == pytest.approx(expected)


def test_drop_path_active_only_in_training(tiny_config):
    torch.manual_seed(0)
    model = ConvNextBackbone(tiny_config.copy(drop_path_rate=0.5, out_features=ALL_STAGES))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    a, b = model(x).feature_maps[-1], model(x).feature_maps[-1]
    torch.testing.assert_close(a, b)
    model.train()
    assert not torch.allclose(model(x).feature_maps[-1], model(x).feature_maps[-1])


def test_layer_scale_and_grn_switches():
    v1 = ConvNextBackbone(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
    block = v1.stages[0][0]
    assert block.gamma is not None and torch.all(block.gamma == 1e-6) and block.grn is None
    v2 = ConvNextBackbone(ConvNextConfig.from_variant("v2-atto", depths=[1, 1, 1, 1]))
    block = v2.stages[0][0]
    assert block.gamma is None and block.grn is not None
    assert block.grn.gamma.shape == (1, 1, 1, 160) and torch.all(block.grn.gamma == 0)


def test_initialisation_follows_initializer_range():
    torch.manual_seed(0)
    cfg = ConvNextConfig(initializer_range=0.05)
    model = ConvNextModel(cfg)
    w = model.stages[2][0].pwconv1.weight
    assert abs(w.std().item() - 0.05) < 0.002 and torch.all(model.stages[2][0].pwconv1.bias == 0)
    assert torch.all(model.norm.weight == 1) and model.norm.eps == 1e-12


@pytest.mark.parametrize("variant", ["tiny", "v2-atto"])
def test_gradient_checkpointing_gives_identical_outputs_and_grads(variant, checkpoint_calls):
    cfg = ConvNextConfig.from_variant(variant, hidden_sizes=[8, 16, 32, 64], depths=[2, 1, 2, 1],
                                      drop_path_rate=0.2, out_features=ALL_STAGES)
    torch.manual_seed(0)
    model = ConvNextBackbone(cfg).train()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x).feature_maps
        sum(o.pow(2).sum() for o in out).backward()
        return [o.detach() for o in out], [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run()
    assert not checkpoint_calls
    model.gradient_checkpointing_enable()
    out, grads = run()
    assert len(checkpoint_calls) == sum(cfg.depths)  # every block checkpointed
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [0, 1, 2, 4])
def test_frozen_stages(tiny_config, frozen):
    model = ConvNextBackbone(tiny_config.copy(out_features=ALL_STAGES, drop_path_rate=0.1),
                             frozen_stages=frozen)
    model.train()
    for i in range(4):
        trainable = {p.requires_grad for m in (model.downsample_layers[i], model.stages[i])
                     for p in m.parameters()}
        assert trainable == {i >= frozen}
        assert model.stages[i].training is (i >= frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("norm"))
    model.eval().train()  # re-applied after .train()
    assert all(not m.training for i in range(frozen) for m in model.stages[i].modules())


@pytest.mark.parametrize("frozen", [-1, 5, 1.5, True])
def test_frozen_stages_errors(tiny_config, frozen):
    with pytest.raises(ValueError, match=r"frozen_stages must be an int in \[0, 4\]"):
        ConvNextBackbone(tiny_config, frozen_stages=frozen)


def test_return_dict_false_and_output_indexing(tiny_config):
    model = ConvNextBackbone(tiny_config.copy(out_indices=[2, 3])).eval()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    tup = model(x, return_dict=False)
    assert len(tup) == 1 and len(tup[0]) == 2
    torch.testing.assert_close(out[0][1], tup[0][1])
    assert out["feature_maps"] is out.feature_maps
    tup = model(x, output_hidden_states=True, return_dict=False)
    assert len(tup) == 2 and len(tup[1]) == 5


def test_model_outputs(tiny_config):
    model = ConvNextModel(tiny_config).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 64, 2, 2)
    ref_pooled = F.layer_norm(out.last_hidden_state.mean((-2, -1)), (64,), model.norm.weight,
                              model.norm.bias, 1e-12)
    torch.testing.assert_close(out.pooler_output, ref_pooled)
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [
        (8, 16, 16), (8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    last, pooled = model(x, return_dict=False)
    torch.testing.assert_close(pooled, out.pooler_output)
    assert out[1] is out.pooler_output and len(out.to_tuple()) == 3


def test_classifier_losses(tiny_config):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = ConvNextForImageClassification(tiny_config.copy(num_labels=5)).eval()
    labels = torch.tensor([0, 1, 4, 2])
    out = model(x, labels=labels)
    assert out.logits.shape == (4, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    loss, logits = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, out.loss)
    assert out[0] is out.loss and model(x)[0].shape == (4, 5)  # None fields are skipped

    reg = ConvNextForImageClassification(tiny_config.copy(num_labels=1)).eval()
    target = torch.randn(4)
    out = reg(x, labels=target)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))

    features = ConvNextForImageClassification(tiny_config.copy(num_labels=0)).eval()
    assert features(x).logits.shape == (4, 64)


def test_classifier_hidden_states_and_checkpointing(tiny_config, checkpoint_calls):
    model = ConvNextForImageClassification(tiny_config.copy(num_labels=3)).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    ref = model(x, output_hidden_states=True)
    model.gradient_checkpointing_enable()
    torch.manual_seed(0)
    out = model(x, output_hidden_states=True)
    assert len(checkpoint_calls) == sum(tiny_config.depths)
    assert len(out.hidden_states) == 5
    torch.testing.assert_close(out.logits, ref.logits)


def test_config_type_error():
    with pytest.raises(TypeError, match="ConvNextConfig"):
        ConvNextBackbone({"depths": [1, 1, 1, 1]})
