from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor.cuda import reference
from compressor.losses import LossInputs


def _make(registry, name: str, **options):
    return registry.create("loss", name, options)


def _inputs(student: dict, teacher: dict, target=None) -> LossInputs:
    return LossInputs(student, teacher, target)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_t_squared_kl_of_softened_distributions(registry, temperature):
    torch.manual_seed(0)
    s, t = torch.randn(7, 11, requires_grad=True), torch.randn(7, 11)
    loss = _make(registry, "kd", temperature=temperature)(_inputs({"output": s}, {"output": t}))
    expected = F.kl_div(
        F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean"
    )
    torch.testing.assert_close(loss, expected * temperature**2)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_is_zero_for_identical_logits_and_reads_taps_when_asked(registry):
    z = torch.randn(4, 5)
    kd = _make(registry, "kd", student="head", teacher="classifier")
    assert kd.reads() == {"student": ["head"], "teacher": ["classifier"]}
    assert float(kd(_inputs({"head": z}, {"classifier": z}))) == pytest.approx(0.0, abs=1e-6)


def test_kd_treats_sequence_logits_as_rows():
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    rows = reference.divergence(s.reshape(6, 9), t.reshape(6, 9), temperature=2.0)
    torch.testing.assert_close(reference.divergence(s, t, temperature=2.0), rows)


def test_ce_matches_cross_entropy_and_needs_no_teacher(registry):
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    ce = _make(registry, "ce", label_smoothing=0.1)
    assert ce.reads() == {"student": ["output"], "teacher": []}
    torch.testing.assert_close(
        ce(_inputs({"output": logits}, {}, target)),
        F.cross_entropy(logits, target, label_smoothing=0.1),
    )
    with pytest.raises(ValueError, match="labels"):
        ce(_inputs({"output": logits}, {}, None))


def test_feature_mse_learns_a_projection_when_widths_differ(registry):
    mse = _make(registry, "feature_mse", student="a", teacher="b")
    mse.setup({"a": (8, 16)}, {"b": (8, 32)})
    assert isinstance(mse.projection, torch.nn.Linear) and mse.projection.weight.shape == (32, 16)
    s, t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 32)
    loss = mse(_inputs({"a": s}, {"b": t}))
    torch.testing.assert_close(loss, F.mse_loss(mse.projection(s), t), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert mse.projection.weight.grad is not None and s.grad is not None


def test_feature_mse_without_projection_when_widths_match(registry):
    mse = _make(registry, "feature_mse", student="a", teacher="b")
    mse.setup({"a": (4, 3, 5)}, {"b": (4, 3, 5)})
    assert mse.projection is None and not list(mse.parameters())
    s, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    torch.testing.assert_close(mse(_inputs({"a": s}, {"b": t})), F.mse_loss(s, t))


def test_conv_features_get_a_1x1_projection_and_pooling_to_the_teacher_size(registry):
    mse = _make(registry, "feature_mse", student="a", teacher="b")
    mse.setup({"a": (2, 4, 8, 8)}, {"b": (2, 16, 4, 4)})
    assert isinstance(mse.projection, torch.nn.Conv2d) and mse.projection.kernel_size == (1, 1)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 4, 4)
    expected = F.mse_loss(F.adaptive_avg_pool2d(mse.projection(s), (4, 4)), t)
    torch.testing.assert_close(mse(_inputs({"a": s}, {"b": t})), expected)


def test_feature_cosine_is_one_minus_cosine_along_channels(registry):
    cos = _make(registry, "feature_cosine", student="a", teacher="b")
    cos.setup({"a": (3, 6, 2, 2)}, {"b": (3, 6, 2, 2)})
    s = torch.randn(3, 6, 2, 2)
    assert float(cos(_inputs({"a": s}, {"b": 2 * s}))) == pytest.approx(0.0, abs=1e-6)
    assert float(cos(_inputs({"a": s}, {"b": -s}))) == pytest.approx(2.0, abs=1e-6)


def test_feature_losses_explain_bad_shapes(registry):
    mse = _make(registry, "feature_mse", student="a", teacher="b", projection="none")
    with pytest.raises(ValueError, match="projection is 'none'"):
        mse.setup({"a": (2, 4)}, {"b": (2, 8)})
    with pytest.raises(
        ValueError, match=r"align: grid needs conv maps .* the student has \[N, 4\]"
    ):
        _make(registry, "feature_mse", student="a", teacher="b", align="grid").setup(
            {"a": (2, 4)}, {"b": (2, 16, 8)}
        )
    with pytest.raises(ValueError, match="both must be batched features"):
        _make(registry, "feature_mse", student="a", teacher="b").setup({"a": (2,)}, {"b": (2, 4)})


def test_a_conv_map_pairs_with_a_token_grid_position_by_position(registry):
    """A CNN student's [N, C, H, W] map against a ViT teacher's [N, 1 + H*W, D] tokens: the
    class token is dropped, the tokens laid out as a map, channels projected C -> D."""
    mse = _make(registry, "feature_mse", student="s", teacher="t")
    mse.setup({"s": (2, 3, 4, 4)}, {"t": (2, 17, 5)})
    assert mse.align == "grid" and tuple(mse.projection.weight.shape) == (5, 3, 1, 1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 17, 5)
    got = mse(_inputs({"s": s}, {"t": t}))
    grid = t[:, 1:].transpose(1, 2).reshape(2, 5, 4, 4)  # token i*4+j -> position (i, j)
    torch.testing.assert_close(got, F.mse_loss(mse.projection(s), grid))
    assert grid[0, :, 1, 2].tolist() == t[0, 1 + 1 * 4 + 2].tolist()


def test_features_of_different_kinds_compare_their_means_when_not_spatial(registry):
    cos = _make(registry, "feature_cosine", student="s", teacher="t")
    cos.setup({"s": (2, 6)}, {"t": (2, 10, 6)})  # 10 tokens: not a square grid
    assert cos.align == "pool" and cos.projection is None
    s, t = torch.randn(2, 6), torch.randn(2, 10, 6)
    want = (1 - F.cosine_similarity(s, t.mean(1), dim=-1)).mean()
    torch.testing.assert_close(cos(_inputs({"s": s}, {"t": t})), want)


def test_kd_between_logits_of_different_widths_is_refused_at_setup(registry):
    kd = _make(registry, "kd")
    with pytest.raises(ValueError, match="has 512 classes and the teacher's 'output' 300"):
        kd.setup({"output": (2, 7, 512)}, {"output": (2, 7, 300)})
