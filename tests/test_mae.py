from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import DIGITS
from test_ofa import _vit
from tiny_models import MLP, SmallCNN

from compressor.capture import capture_module
from compressor.cli import main
from compressor.errors import PassError
from compressor.graph_pass import (
    PassContext,
    draw_graph_inputs,
    graph_inputs,
    run_passes,
    split_outputs,
)
from compressor.passes.mae_mask import keep_tokens
from compressor.testing import check_pass

IMAGES = torch.randn(6, 1, 8, 8)


def _masked_forward(model, x, keep):
    """The ViT forward by hand with the visible tokens selected before block 0."""
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], 1) + model.pos_embed
    return model.head(model.norm(model.blocks(keep_tokens(tokens, keep, 1)))[:, 0])


def _trace(model):
    return capture_module(model, (IMAGES,), "student", "symbolic_trace")


def test_mask_selects_the_same_visible_patches_the_model_would(registry):
    model = _vit().eval()
    gm = _trace(model)
    mask = registry.create("graph_pass", "mae_mask", {})
    keep = torch.sort(torch.rand(6, 16).argsort(1)[:, :4], 1).values
    gm = check_pass(
        mask,
        gm,
        PassContext("student"),
        (IMAGES,),
        modified=True,
        node_delta=2,
        same_output=False,
        inputs_after=(IMAGES, keep),
    )
    assert graph_inputs(gm) == {"patch_keep": {"kind": "random_keep", "tokens": 16, "keep": 4}}
    with torch.no_grad():
        torch.testing.assert_close(
            gm(IMAGES, patch_keep=keep), _masked_forward(model, IMAGES, keep)
        )
    stripped = run_passes(gm, [registry.create("graph_pass", "strip", {})], PassContext("student"))
    assert not graph_inputs(stripped) and [
        n.target for n in stripped.graph.nodes if n.op == "placeholder"
    ] == ["x"]
    torch.testing.assert_close(stripped(IMAGES), model(IMAGES))


def test_teacher_and_student_draw_one_mask_per_sample(registry):
    half = registry.create("graph_pass", "mae_mask", {"ratio": 0.5})
    teacher, student = (
        run_passes(_trace(_vit().eval()), [half], PassContext(role))
        for role in ("teacher", "student")
    )
    torch.manual_seed(0)
    keep = draw_graph_inputs([student, teacher], 6, torch.device("cpu"))["patch_keep"]
    assert keep.shape == (6, 8) and all(len(set(row.tolist())) == 8 for row in keep)
    assert not torch.equal(keep[0], keep[1])  # drawn per sample, one tensor for both graphs
    quarter = run_passes(
        _trace(_vit().eval()),
        [registry.create("graph_pass", "mae_mask", {})],
        PassContext("teacher"),
    )
    with pytest.raises(ValueError, match="drawn differently"):
        draw_graph_inputs([student, quarter], 6, torch.device("cpu"))


def test_truncated_masked_teacher_runs_k_blocks_on_visible_tokens(registry):
    teacher = _vit(depth=6).eval()
    gm = _trace(teacher)
    passes = [
        registry.create("graph_pass", name, {}) for name in ("mae_mask", "tap", "truncate_teacher")
    ]
    gm = run_passes(gm, passes, PassContext("teacher", ["blocks.2"], output_needed=False))
    attention = [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and str(n.target).endswith(".attn")
    ]
    assert attention == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]  # 3 of 6 blocks
    keep = torch.sort(torch.rand(6, 16).argsort(1)[:, :4], 1).values
    output, taps = split_outputs(gm, gm(IMAGES, patch_keep=keep))
    assert output is None and taps["blocks.2"].shape == (6, 5, 16)  # class token + 4 of 16 patches


def test_a_graph_with_baked_token_counts_gets_a_clear_error(registry):
    gm = capture_module(_vit().eval(), (IMAGES,), "teacher", "export")
    with pytest.raises(
        PassError,
        match="captured by torch.export, which bakes the token count .* capture.method: symbolic_trace",
    ):
        run_passes(gm, [registry.create("graph_pass", "mae_mask", {})], PassContext("teacher"))


def test_a_model_without_patch_tokens_gets_a_clear_error(registry):
    mask = registry.create("graph_pass", "mae_mask", {})
    gm = capture_module(MLP().eval(), (torch.randn(3, 64),), "student", "symbolic_trace")
    with pytest.raises(
        PassError, match="the student has no module 'blocks.0', so no patch tokens to mask"
    ):
        run_passes(gm, [mask], PassContext("student"))
    cnn = registry.create("graph_pass", "mae_mask", {"block": "features.3"})
    gm = capture_module(SmallCNN().eval(), (IMAGES,), "student", "symbolic_trace")
    with pytest.raises(PassError) as info:
        run_passes(gm, [cnn], PassContext("student"))
    assert (
        "is not patch tokens (N, T, D)" in str(info.value)
        and ", 4, 8, 8]" in str(info.value)
        and "at node" in str(info.value)
    )


MAE_RECIPE = f"""\
name: mae
teacher:
  model: {DIGITS}/models.py:vit
  kwargs: {{dim: 32, depth: 4, heads: 2}}
student:
  model: {DIGITS}/models.py:vit
  kwargs: {{dim: 16, depth: 2, heads: 2}}
data:
  loader: digits
  kwargs: {{train_limit: 128}}
  batch_size: 32
capture:
  method: symbolic_trace
passes:
  - name: mae_mask
    target: both
losses:
  - name: feature_l1
    student: blocks.1
    teacher: blocks.1
train:
  steps: 6
  eval_every: 3
  checkpoint_every: 3
report:
  latency_repeats: 2
"""


def test_mae_recipe_distils_on_visible_tokens_and_exports_the_plain_student(
    write_recipe, tmp_path, capsys
):
    path = write_recipe(MAE_RECIPE)
    assert main(["graph", str(path)]) == 0
    listing = capsys.readouterr().out
    teacher = listing.split("== student graph")[0]
    assert "patch_keep" in teacher and "blocks.2" not in teacher and "head" not in teacher
    assert "blocks.1.attn" in teacher
    assert main([str(path), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["exports"][0]["ok"]
    model = onnx.load(report["exports"][0]["path"])
    assert [i.name for i in model.graph.input] == ["x"]
    assert not any(n.op_type == "GatherElements" for n in model.graph.node)


def test_partial_execution_cuts_teacher_flops_to_a_third(capsys):
    """FLOPs are counted, not timed: (c) must be at most 35% of (a). Time ratios live in the
    benchmark output only."""
    from compressor.bench.partial import bench_partial

    rows = list(
        bench_partial(f"{DIGITS}/models.py:vit_teacher", "blocks.3", 0.75, batch=8, reps=1).values()
    )
    (full, _), (truncated, _), (masked, _) = rows
    assert masked < truncated < full
    assert truncated / full == pytest.approx(0.66, abs=0.03)  # 4 of 6 blocks
    assert masked / full <= 0.35
    assert "GFLOP" in capsys.readouterr().out
