"""Parity with the peers on shared weights (fp32, max abs diff <= 1e-5).

Each peer model (timm, torchvision, transformers) is built with random weights (norms,
layer scale and GRN moved away from their defaults so that a mapping bug shows), its
state dict is converted and loaded into this package, and the stage outputs are compared.
The export direction is checked too: our weights converted back to the peer's format
equal the peer's own tensors.
"""
from __future__ import annotations

import re

from typing import Callable, Dict, List, NamedTuple

import pytest
import torch

from convnext_backbone import ConvNextBackbone, ConvNextForImageClassification, ConvNextModel
from convnext_backbone.checkpoints import (canonical_state_dict, detect_format, from_canonical,
                                           infer_config, load_into, to_canonical)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]
OUT_NORMS = [f"norm{i}.{t}" for i in range(4) for t in ("weight", "bias")]


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Moves every parameter away from its init; layer scale and GRN (zeros/1e-6 at init,
    which would hide a bug in their mapping) get O(0.5) values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "grn" in name or "gamma" in name or "layer_scale" in name:
                p.copy_(noise * 0.5)
            elif p.dim() >= 2:  # conv/linear weights: keep activations O(1) through the depth
                p.copy_(noise * 0.02)
            else:
                p.add_(noise * 0.1)
    return module.eval()


def pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def max_diffs(ref: List[torch.Tensor], out: List[torch.Tensor]) -> List[float]:
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert a.shape == b.shape, (a.shape, b.shape)
    return [(a - b).abs().max().item() for a, b in zip(ref, out)]


class Peer(NamedTuple):
    model: torch.nn.Module
    fmt: str
    # Reference stage outputs for pixels: raw stage1..4 ("hidden") or normed maps ("features").
    reference: Callable[[torch.Tensor], List[torch.Tensor]]
    compare: str
    out_features: List[str]
    # Module tensors the peer's checkpoint cannot provide (the out norms of timm/torchvision).
    expected_missing: List[str]
    export_kwargs: Dict


def _timm(name: str, features_only: bool = False) -> Peer:
    model = randomise(timm.create_model(name, pretrained=False, features_only=features_only))
    if features_only:
        ref = lambda x: list(model(x))  # noqa: E731
    else:
        ref = lambda x: model.forward_intermediates(x, indices=4, intermediates_only=True)  # noqa: E731
    conv_mlp = model.state_dict()[next(k for k in model.state_dict() if "mlp.fc1.weight" in k)].dim() == 4
    return Peer(model, "timm", ref, "hidden", ALL_STAGES[1:], OUT_NORMS,
                dict(drop_unsupported=True, pointwise_as_conv=conv_mlp))


def _torchvision(name: str) -> Peer:
    if name == "atto":  # torchvision ships tiny..large; a small one from its own building blocks
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        setting = [CNBlockConfig(40, 80, 2), CNBlockConfig(80, 160, 2), CNBlockConfig(160, 320, 6),
                   CNBlockConfig(320, None, 2)]
        model = randomise(ConvNeXt(setting))
    else:
        model = randomise(getattr(torchvision.models, name)(weights=None))

    def ref(x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i, layer in enumerate(model.features):
            x = layer(x)
            if i in (1, 3, 5, 7):
                outs.append(x)
        return outs

    return Peer(model, "torchvision", ref, "hidden", ALL_STAGES[1:], OUT_NORMS,
                dict(drop_unsupported=True))


def _transformers_backbone(variant: str, v2: bool) -> Peer:
    from transformers import (ConvNextBackbone as HFBackbone, ConvNextConfig as HFConfig,
                              ConvNextV2Backbone as HFV2Backbone, ConvNextV2Config as HFV2Config)
    from convnext_backbone import ConvNextConfig

    ours = ConvNextConfig.from_variant(variant)
    # Lists, not tuples: transformers 5.x crashes on tuple hidden_sizes (ANCHORS.md §1).
    args = dict(hidden_sizes=list(ours.hidden_sizes), depths=list(ours.depths), out_features=ALL_STAGES)
    model = HFV2Backbone(HFV2Config(**args)) if v2 else HFBackbone(HFConfig(**args))
    model = randomise(model)  # includes hidden_states_norms, so the out norms are checked
    return Peer(model, "transformers", lambda x: list(model(x).feature_maps), "features",
                ALL_STAGES, [], {})


# ConvNeXt-T and V2-tiny (the published sizes) are slow-marked; the atto sizes (V1 with
# layer scale, V2 with GRN) keep every peer in the fast run.
PEERS = {
    "timm-atto": lambda: _timm("convnext_atto"),
    "timm-v2-atto": lambda: _timm("convnextv2_atto"),  # conv_mlp: 1x1-conv MLP weights
    "timm-features_only-v2-atto": lambda: _timm("convnextv2_atto", features_only=True),
    "timm-tiny": lambda: _timm("convnext_tiny"),
    "timm-features_only-tiny": lambda: _timm("convnext_tiny", features_only=True),
    "timm-v2-tiny": lambda: _timm("convnextv2_tiny"),
    "torchvision-atto": lambda: _torchvision("atto"),
    "torchvision-tiny": lambda: _torchvision("convnext_tiny"),
    "transformers-atto": lambda: _transformers_backbone("v2-atto", v2=False),
    "transformers-v2-atto": lambda: _transformers_backbone("v2-atto", v2=True),
    "transformers-tiny": lambda: _transformers_backbone("tiny", v2=False),
    "transformers-v2-tiny": lambda: _transformers_backbone("v2-tiny", v2=True),
}
SLOW = {n for n in PEERS if n.endswith("tiny")}


@pytest.mark.parametrize("peer_name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in PEERS])
def test_backbone_parity_with_peer(peer_name: str) -> None:
    peer = PEERS[peer_name]()
    peer_sd = peer.model.state_dict()
    assert detect_format(peer_sd) == peer.fmt

    canonical, conversion = to_canonical(peer_sd)
    assert conversion.unrecognised == [] and conversion.ignored == []
    assert len(conversion.mapped) == len(peer_sd)
    config = infer_config(canonical, out_features=peer.out_features)
    backbone = ConvNextBackbone(config).eval()
    report = load_into(backbone, peer_sd, strict=not peer.expected_missing)
    # Exactly the out norms the peer has no counterpart for, nothing else.
    assert report.missing_keys == peer.expected_missing
    assert report.unexpected_keys == [] and report.mismatched_shapes == []

    x = pixels()
    with torch.no_grad():
        ref = peer.reference(x)
        out = backbone(x, output_hidden_states=True)
    ours = list(out.hidden_states[1:]) if peer.compare == "hidden" else list(out.feature_maps)
    diffs = max_diffs(ref, ours)
    assert max(diffs) <= TOL, f"{peer_name}: max abs diffs per stage {diffs}"
    # The outputs are not trivially equal (e.g. all zeros): the comparison means something.
    assert all(r.abs().max() > 1e-2 for r in ref)
    print(peer_name, "max abs diffs", diffs, "max |ref|", [round(r.abs().max().item(), 2) for r in ref])

    # Export: our weights back in the peer's layout equal the peer's own tensors.
    exported = from_canonical(canonical_state_dict(backbone), peer.fmt, **peer.export_kwargs)
    # timm features_only models rename `stem.0` -> `stem_0`, `stages.0` -> `stages_0`.
    peer_sd = {re.sub(r"^(stem|stages)_(\d+)\.", r"\1.\2.", k): v for k, v in peer_sd.items()}
    for key, tensor in exported.items():
        assert key in peer_sd, f"exported key {key!r} is not a {peer.fmt} key"
        assert torch.equal(tensor, peer_sd[key]), key
    head_keys = {k for k in peer_sd if k.startswith(("head.", "classifier."))}
    assert set(peer_sd) - set(exported) == head_keys  # the backbone has no classifier head


def _hf_pair(v2: bool, sizes, depths, num_labels: int):
    from transformers import (ConvNextConfig as HFConfig, ConvNextForImageClassification as HFCls,
                              ConvNextV2Config as HFV2Config,
                              ConvNextV2ForImageClassification as HFV2Cls)

    args = dict(hidden_sizes=list(sizes), depths=list(depths), num_labels=num_labels)
    return randomise(HFV2Cls(HFV2Config(**args)) if v2 else HFCls(HFConfig(**args)), seed=3)


@pytest.mark.parametrize("v2,sizes,depths", [
    (False, [8, 16, 32, 64], [1, 1, 2, 1]),
    (True, [8, 16, 32, 64], [1, 1, 2, 1]),
    pytest.param(False, [96, 192, 384, 768], [3, 3, 9, 3], marks=pytest.mark.slow),
    pytest.param(True, [40, 80, 160, 320], [2, 2, 6, 2], marks=pytest.mark.slow),
])
def test_model_and_classifier_parity_with_transformers(v2, sizes, depths) -> None:
    hf = _hf_pair(v2, sizes, depths, num_labels=7)
    hf_sd = hf.state_dict()
    canonical, _ = to_canonical(hf_sd)
    config = infer_config(canonical)  # transformers' final norm eps (1e-12) is our default
    assert (config.use_grn, config.num_labels, config.depths, config.hidden_sizes) == (v2, 7, depths, sizes)

    classifier = ConvNextForImageClassification(config).eval()
    report = load_into(classifier, hf_sd, strict=True)
    assert report.ok and report.ignored_keys == []
    # The bare model from the classifier's checkpoint: the head is ignored, not an error.
    model = ConvNextModel(config).eval()
    report = load_into(model, hf_sd, strict=True)
    assert report.ignored_keys == ["head.weight", "head.bias"]

    x = pixels(2)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        ref_model = hf.convnextv2(x) if v2 else hf.convnext(x)
        logits = classifier(x).logits
        out = model(x, output_hidden_states=True)
    assert (logits - ref.logits).abs().max().item() <= TOL
    assert (out.pooler_output - ref_model.pooler_output).abs().max().item() <= TOL
    assert (out.last_hidden_state - ref_model.last_hidden_state).abs().max().item() <= TOL
    assert max(max_diffs(list(ref.hidden_states), list(out.hidden_states))) <= TOL
    assert ref.logits.abs().max() > 1e-2

    # And back: our classifier's tensors in transformers' layout are transformers' own.
    exported = from_canonical(canonical_state_dict(classifier), "transformers")
    assert set(exported) == set(hf_sd)
    assert all(torch.equal(exported[k], hf_sd[k]) for k in hf_sd)
