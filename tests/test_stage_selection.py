import pytest

from convnext_backbone import ConvNextConfig
from convnext_backbone.stage_selection import resolve_out_features_out_indices

NAMES = ["stem", "stage1", "stage2", "stage3", "stage4"]


@pytest.mark.parametrize("features, indices, expected", [
    (None, None, (["stage4"], [4])),
    (["stage1", "stage3"], None, (["stage1", "stage3"], [1, 3])),
    (("stage1", "stage3"), None, (["stage1", "stage3"], [1, 3])),  # tuples too
    (None, [0, 2], (["stem", "stage2"], [0, 2])),
    (None, (1, 2, 3, 4), (["stage1", "stage2", "stage3", "stage4"], [1, 2, 3, 4])),
    (None, [-2, -1], (["stage3", "stage4"], [3, 4])),
    (None, [0, -1], (["stem", "stage4"], [0, 4])),
    (None, [-5], (["stem"], [0])),
    (["stem", "stage4"], [0, -1], (["stem", "stage4"], [0, 4])),
    (["stage2"], (2,), (["stage2"], [2])),
])
def test_valid_selections(features, indices, expected):
    assert resolve_out_features_out_indices(features, indices, NAMES) == expected


@pytest.mark.parametrize("features, indices, message", [
    ("stage1", None, "list or tuple of stage names"),
    ([], None, "must not be empty"),
    (["stage5"], None, r"'stage5' is not a stage; valid names: \['stem', 'stage1'"),
    (["stage1", "stage1"], None, "names a stage twice"),
    (["stage3", "stage1"], None, "must be in stage order"),
    (None, 3, "list or tuple of ints"),
    (None, [], "must not be empty"),
    (None, [5], r"index 5 is out of range; valid indices: \[0, 1, 2, 3, 4\] \(or negative, down to -5\)"),
    (None, [-6], "index -6 is out of range"),
    (None, [-7], "index -7 is out of range"),  # transformers: IndexError later
    (None, [1.0], "must contain ints"),
    (None, [True], "must contain ints"),
    (None, [-1, 4], "names a stage twice"),
    (None, [3, 1], "must be in stage order"),
    (None, [-1, 0], "must be in stage order"),
    (["stage1", "stage2"], [1], "same length"),
    (["stage1", "stage2"], [1, 3], "name different stages"),
])
def test_invalid_selections(features, indices, message):
    with pytest.raises(ValueError, match=message):
        resolve_out_features_out_indices(features, indices, NAMES)


def test_config_setters_keep_pair_aligned():
    cfg = ConvNextConfig(out_indices=[1, 2])
    cfg.out_features = ["stage3", "stage4"]
    assert cfg.out_indices == [3, 4]
    cfg.out_indices = (-1,)
    assert cfg.out_features == ["stage4"]
    with pytest.raises(ValueError, match="valid names"):
        cfg.out_features = ["stage9"]


@pytest.mark.parametrize("features, indices", [
    (None, None), (["stage1", "stage3"], None), (None, [0, 2]), (None, [1, 2, 3, 4]),
    (["stem", "stage4"], [0, 4]), (None, [-2, -1]),
])
def test_agrees_with_transformers_on_valid_cases(features, indices):
    transformers = pytest.importorskip("transformers")
    ref = transformers.ConvNextConfig(out_features=features, out_indices=indices,
                                      hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    ours = ConvNextConfig(out_features=features, out_indices=indices)
    assert ours.out_features == list(ref.out_features)
    assert ours.out_indices == [i % len(NAMES) for i in ref.out_indices]


@pytest.mark.parametrize("features, indices", [
    (["stage5"], None), (["stage1", "stage1"], None), (["stage3", "stage1"], None),
    (None, [5]), (None, [-1, 4]), (None, [3, 1]), (["stage1", "stage2"], [1]),
    (["stage1", "stage2"], [1, 3]),
])
def test_rejects_what_transformers_rejects(features, indices):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError):
        transformers.ConvNextConfig(out_features=features, out_indices=indices,
                                    hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    with pytest.raises(ValueError):
        ConvNextConfig(out_features=features, out_indices=indices)
