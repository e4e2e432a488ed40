from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS, FAST_RECIPE, TINY
from tiny_models import MLP, SmallCNN

from compressor.capture import capture_module
from compressor.cli import main
from compressor.errors import PassError
from compressor.graph_pass import SCAFFOLD_META, PassContext, run_passes, split_outputs, tapped
from compressor.losses import LossInputs
from compressor.passes.ofa_branches import default_stages
from compressor.plugin_manager import make_plugin_manager  # noqa: F401  (registry fixture loads it)
from compressor.testing import check_pass

IMAGES = torch.randn(5, 1, 8, 8)


def _vit(depth: int = 4):
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_models", DIGITS / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vit(dim=16, depth=depth, heads=2)


def _capture(model, x=IMAGES):
    return capture_module(model.train(), (x,), "student", "export")


@pytest.mark.parametrize(
    ("name", "make", "x", "stages"),
    [
        ("vit", _vit, IMAGES, ["blocks.0", "blocks.1", "blocks.2"]),
        ("cnn", lambda: SmallCNN(width=4), IMAGES, None),
        ("mlp", lambda: MLP(depth=4), torch.randn(5, 64), ["layers.0", "layers.1", "layers.2"]),
    ],
)
def test_branches_on_each_stage_kind(registry, name, make, x, stages):
    model = make()
    options = {"stages": stages} if stages else {"stages": ["features.2", "features.3"]}
    ofa = registry.create("graph_pass", "ofa_branches", options)
    context = PassContext("student", ["@ofa"])
    count = len(options["stages"])
    model.eval()  # numerics: dropout off while comparing
    gm = check_pass(
        ofa,
        capture_module(model, (x,), "student", "export"),
        context,
        (x,),
        modified=True,
        node_delta=count + 1,
    )
    output, taps = split_outputs(gm, gm(x))
    assert taps["@ofa"].shape == (count, 5, 10)
    torch.testing.assert_close(output, model(x))
    heads = [type(h).__name__ for h in gm.ofa_branches]
    assert (
        set(heads) == {"vit": {"TokenBranch"}, "cnn": {"ConvBranch"}, "mlp": {"VectorBranch"}}[name]
    )
    strip = registry.create("graph_pass", "strip", {})
    stripped = run_passes(gm, [strip], PassContext("student"))
    assert not hasattr(stripped, "ofa_branches") and not tapped(stripped)
    assert sum(p.numel() for p in stripped.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_default_stages_are_evenly_spaced_blocks(registry):
    gm = _capture(_vit(depth=8))
    ofa = registry.create("graph_pass", "ofa_branches", {})
    gm = run_passes(gm, [ofa], PassContext("student", ["@ofa"]))
    calls = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and str(n.target).startswith("ofa_branches")
    ]
    assert [
        n.args[0].meta["nn_module_stack"]
        and list(n.args[0].meta["nn_module_stack"].values())[-1][0].split(".")[:2]
        for n in calls
    ] == [
        ["blocks", "1"],
        ["blocks", "3"],
        ["blocks", "5"],
    ]
    assert all(n.meta[SCAFFOLD_META] for n in calls)


def test_default_stages_of_a_residual_cnn_are_its_stages_and_validate_shows_them(
    registry, write_recipe, capsys
):
    """torchvision-style names (stem, layer1..layer4): the branches go on layer1..layer3,
    not on the stem's layers, and validate says which nodes they read."""
    from tiny_models import ResNetLike

    gm = capture_module(ResNetLike().train(), (torch.randn(4, 1, 8, 8),), "student", "export")
    assert default_stages(gm) == ["layer1", "layer2", "layer3"]
    text = (
        FAST_RECIPE.replace(f"{TINY}:mlp\n  kwargs: {{width: 8, depth: 2}}", f"{TINY}:resnet")
        .replace("kwargs: {train_limit: 256, flatten: true}", "kwargs: {train_limit: 256}")
        .replace(
            "  - name: feature_mse\n    student: layers.1\n    teacher: layers.2\n",
            "  - name: ofa\n",
        )
        .replace(f"{TINY}:mlp\n  kwargs: {{width: 32, depth: 4}}", f"{TINY}:cnn")
    )
    assert main(["validate", str(write_recipe(text))]) == 0
    out = capsys.readouterr().out
    assert "ofa_branches: branches on 3 stages (found by structure): layer1 (node" in out
    assert "layer3 (node" in out and "[N, 16, 2, 2]" in out and "stem" not in out


def test_branch_width_is_the_larger_of_stage_and_teacher_pre_logit(registry):
    teacher = capture_module(
        MLP(width=48, depth=2).eval(), (torch.randn(3, 64),), "teacher", "export"
    )
    gm = capture_module(MLP(width=16, depth=3).train(), (torch.randn(3, 64),), "student", "export")
    ofa = registry.create("graph_pass", "ofa_branches", {"stages": ["layers.0"]})
    gm = run_passes(gm, [ofa], PassContext("student", ["@ofa"], peer=teacher))
    assert gm.ofa_branches[0][0].out_features == 48


def test_token_branch_merges_large_grids():
    from compressor.passes.ofa_branches import TokenBranch

    branch = TokenBranch(65, 12, 24, 10, blocks=1)  # 8x8 patches + a class token
    assert len(branch.merge) == 1
    assert branch(torch.randn(2, 65, 12)).shape == (2, 10)


class Odd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.layers[0](x)
        volume = self.layers[1](h[:, :, None, None, None].expand(-1, -1, 2, 2, 2))  # 5-D stage
        return self.head(h + volume.mean(dim=(2, 3, 4)))


def test_an_unsupported_stage_shape_names_the_node_and_shape(registry):
    gm = capture_module(Odd().train(), (torch.randn(3, 64),), "student", "export")
    ofa = registry.create("graph_pass", "ofa_branches", {"stages": ["layers.1"]})
    with pytest.raises(PassError) as info:
        run_passes(gm, [ofa], PassContext("student", ["@ofa"]))
    message = str(info.value)
    assert (
        "'ofa_branches'" in message
        and "stage 'layers.1'" in message
        and "has shape [N, 8, 2, 2, 2]" in message  # no internal batch symbol (s77)
    )
    assert (
        "(N, C, H, W) feature maps, (N, L, D) tokens or (N, D) vectors" in message
        and "at node" in message
    )


def test_ofa_loss_formula(registry):
    torch.manual_seed(0)
    s, t, branches = torch.randn(6, 10), torch.randn(6, 10), torch.randn(2, 6, 10)
    y = torch.randint(0, 10, (6,))
    loss = registry.create(
        "loss",
        "ofa",
        {"eps": [1.0, 1.5], "eps_final": 1.2, "branch_weight": 0.5, "temperature": 2.0},
    )
    got = loss(LossInputs({"output": s, "@ofa": branches}, {"output": t}, y))

    def term(z, eps):
        m = F.one_hot(y, 10).float()
        w = (F.softmax(t / 2, -1) + m) ** eps - m
        return -(w * F.log_softmax(z / 2, -1)).sum(-1).mean()

    torch.testing.assert_close(
        got, term(s, 1.2) + 0.5 * (term(branches[0], 1.0) + term(branches[1], 1.5))
    )
    soft_ce = -(F.softmax(t / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1).mean()
    torch.testing.assert_close(term(s, 1.0), soft_ce)  # eps = 1: plain soft cross entropy


OFA_RECIPE = FAST_RECIPE.replace(
    f"  model: {TINY}:mlp\n  kwargs: {{width: 32, depth: 4}}",
    f"  model: {TINY}:cnn\n  kwargs: {{width: 8}}",
).replace("  kwargs: {train_limit: 256, flatten: true}", "  kwargs: {train_limit: 256}")
OFA_RECIPE = (
    OFA_RECIPE[: OFA_RECIPE.index("losses:")]
    + (
        "losses:\n  - name: ce\n  - name: ofa\n    eps: [1.0]\n    branch_weight: 0.5\n"
        "passes:\n  - name: ofa_branches\n    stages: [layers.0]\n"
    )
    + OFA_RECIPE[OFA_RECIPE.index("train:") :]
)


def test_ofa_recipe_trains_and_exports_the_plain_student(write_recipe, tmp_path, capsys):
    path = write_recipe(OFA_RECIPE)
    assert main(["graph", str(path)]) == 0
    assert "<- tap '@ofa'" in capsys.readouterr().out
    assert main([str(path), "--quiet", "train.steps=12"]) == 0
    run = tmp_path / "run"
    assert "ofa" in (run / "metrics.jsonl").read_text()
    report = json.loads((run / "report.json").read_text())
    assert report["exports"][0]["ok"]
    model = onnx.load(report["exports"][0]["path"])
    weights = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    params = sum(int(torch.tensor(list(init.dims)).prod()) if init.dims else 1 for init in weights)
    assert (
        params == report["models"]["student"]["parameters"] == 8 * 64 + 8 + 8 * 8 + 8 + 10 * 8 + 10
    )
    assert not any(
        "ofa" in node.name.lower() or "branch" in node.name.lower() for node in model.graph.node
    )
