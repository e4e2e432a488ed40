from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import ClassVar

import onnx
import pytest
import torch
from conftest import FAST_RECIPE, TESTS, install_outside, run_compress
from pydantic import BaseModel, ConfigDict

from compressor import hookimpl
from compressor.cli import main
from compressor.errors import PluginError, RecipeErrors
from compressor.graph_pass import GraphPass, PassResult
from compressor.module_pass import ModulePass
from compressor.plan import build_plan
from compressor.plugin_manager import AUTOLOAD_ENV
from compressor.recipe_file import load_recipe
from compressor.registry import Registry

BUILTIN = {
    "capture",
    "loaders",
    "losses",
    "optim",
    "onnx",
    "onnx_int8",
    "report",
    "tap",
    "truncate_teacher",
    "strip",
    "ofa_branches",
    "mae_mask",
    "moe_upcycle",
    "router_logits",
    "moe_losses",
    "preference",
    "student_layers",
    "prune_vocab",
    "prune_ffn",
    "fused_head",
    "hf_loaders",
    "transformer_losses",
    "hf_export",
    "evaluators",
    "ernie_tiny",
}


def test_builtins_load_through_entry_points(registry):
    assert {p.name for p in registry.plugins} >= BUILTIN
    assert all(p.distribution == "compressor" for p in registry.plugins if p.name in BUILTIN)
    assert registry.names("loss") == [
        "attention_kl",
        "ce",
        "dpo",
        "embedding_cosine",
        "embedding_mse",
        "feature_cosine",
        "feature_l1",
        "feature_mse",
        "hidden_mse",
        "kd",
        "moe_balance",
        "ofa",
    ]
    assert registry.names("module_pass") == [
        "moe_routing",
        "moe_upcycle",
        "prune_ffn",
        "prune_vocab",
        "student_layers",
    ]
    assert registry.names("exporter") == ["hf", "hf_int8", "onnx", "onnx_int8"]
    assert registry.names("graph_pass") == [
        "fused_head",
        "mae_mask",
        "ofa_branches",
        "router_logits",
        "strip",
        "tap",
        "truncate_teacher",
    ]
    assert registry.components["loss"]["kd"].plugin == "losses"


def test_plugins_command_lists_origin_and_what_each_provides(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "losses  (compressor 0.1.0; compressor.plugins.losses)" in out
    assert "    loss: ce, feature_cosine, feature_l1, feature_mse, kd, ofa" in out
    assert "    graph pass: truncate_teacher" in out and "hooks: compressor_graph_passes" in out


def test_disabling_a_builtin_removes_what_it_provides(write_recipe, capsys):
    registry = Registry.load(disabled=["losses", "transformer_losses", "moe_losses", "preference"])
    assert registry.names("loss") == []
    assert "kd" not in Registry.load(disabled=["losses"]).names("loss")
    assert main(["-p", "no:losses", "validate", str(write_recipe())]) == 2
    assert "unknown loss 'kd'" in capsys.readouterr().err


def _fake_distribution(root: Path, name: str, modules: dict[str, str]) -> None:
    """A distribution on sys.path the way pip leaves one: modules plus a dist-info folder."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{module} = {module}\n" for module in modules)
    (info / "entry_points.txt").write_text(f"[compressor.plugins]\n{lines}")


BROKEN = {
    "fails_on_import": (
        "raise ImportError('needs libfoo')",
        "plugin 'fails_on_import' (broken 1.0) failed to import 'fails_on_import': ImportError: needs libfoo",
    ),
    "bad_signature": (
        "from compressor import hookimpl\n@hookimpl\ndef compressor_losses(color):\n    return []",
        "plugin 'bad_signature' (broken 1.0) registers a bad hook",
    ),
    "unknown_hook": (
        "from compressor import hookimpl\n@hookimpl\ndef compressor_loses():\n    return []",
        "plugin 'unknown_hook' (broken 1.0) defines unknown hook 'compressor_loses' (did you mean 'compressor_losses'?)",
    ),
    "not_a_component": (
        "from compressor import hookimpl\n@hookimpl\ndef compressor_losses():\n    return [dict]",
        "plugin 'not_a_component', hook compressor_losses: returned <class 'dict'>, which is not a LossTerm subclass",
    ),
    "duplicate_name": (
        "from compressor import hookimpl\nfrom compressor.plugins.losses import LogitKD\n"
        "class KD(LogitKD):\n    pass\n@hookimpl\ndef compressor_losses():\n    return [KD]",
        "loss 'kd' is provided by two plugins",
    ),
}


@pytest.mark.parametrize("module", sorted(BROKEN))
def test_a_broken_plugin_is_named_with_its_hook_and_can_be_disabled(module, tmp_path, monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV)  # a user's default: every installed plugin loads
    source, expected = BROKEN[module]
    _fake_distribution(tmp_path, "broken", {module: source})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as info:
        Registry.load()
    assert expected in str(info.value)
    assert module not in {p.name for p in Registry.load(disabled=[module]).plugins}
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert {p.name for p in Registry.load().plugins} == BUILTIN


def test_unknown_dash_p_plugin_is_an_error():
    with pytest.raises(
        PluginError, match="-p nosuchplugin: no plugin entry point or importable module"
    ):
        Registry.load(enabled=["nosuchplugin"])


@pytest.fixture(scope="module")
def installed_demo(tmp_path_factory) -> Path:
    """tests/plugin_pkg installed the way a user would, into a folder outside the repo."""
    return install_outside(TESTS / "plugin_pkg", tmp_path_factory.mktemp("site"))


def _compress(
    site: Path, cwd: Path, *args: str, autoload: bool = True
) -> subprocess.CompletedProcess[str]:
    return run_compress(*args, cwd=cwd, path=(site,), autoload=autoload)


def test_an_installed_third_party_plugin_shows_up_and_works_in_a_recipe(
    installed_demo, write_recipe, tmp_path
):
    listing = _compress(installed_demo, tmp_path, "plugins")
    assert listing.returncode == 0, listing.stderr
    assert "demo  (compressor-demo-plugin 0.2.0; compressor_demo_plugin)" in listing.stdout
    assert (
        "    graph pass: gelu_activations" in listing.stdout
        and "    loss: logit_l1" in listing.stdout
    )

    text = (
        FAST_RECIPE.replace("losses:\n", "losses:\n  - name: logit_l1\n    scale: 0.1\n")
        + "passes:\n  - name: gelu_activations\n"
    )
    path = write_recipe(text)
    run = _compress(installed_demo, tmp_path, str(path), "--quiet", "train.steps=10")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "logit_l1" in [loss["name"] for loss in report["losses"]]
    assert "logit_l1" in (tmp_path / "run" / "metrics.jsonl").read_text()
    ops = {node.op_type for node in onnx.load(report["exports"][0]["path"]).graph.node}
    assert "Gelu" in ops and "Relu" not in ops  # the plugin's rewrite is in the deployed student
    assert report["exports"][0]["ok"]

    disabled = _compress(installed_demo, tmp_path, "-p", "no:demo", "validate", str(path))
    assert disabled.returncode == 2 and "unknown loss 'logit_l1'" in disabled.stderr
    no_autoload = _compress(installed_demo, tmp_path, "plugins", autoload=False)
    assert "demo" not in no_autoload.stdout and "losses" in no_autoload.stdout
    explicit = _compress(installed_demo, tmp_path, "-p", "demo", "plugins", autoload=False)
    assert "gelu_activations" in explicit.stdout


class ReluToGelu(ModulePass):
    """Swap the student's ReLU modules for GELU before capture."""

    name = "relu_to_gelu"

    def __call__(self, module, context):
        for parent in module.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.ReLU):
                    setattr(parent, child_name, torch.nn.GELU())
        return module


class RecipeRules:
    @hookimpl
    def compressor_module_passes(self):
        return [ReluToGelu]

    @hookimpl
    def compressor_validate_recipe(self, recipe):
        return ["seed must be even in this lab"] if recipe.seed % 2 else []


class LabelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str


class RecordGraph(GraphPass[LabelOptions]):
    """Record which graph it ran on, with its option; changes nothing."""

    name = "record_graph"
    calls: ClassVar[list[tuple[str, str]]] = []

    def __call__(self, gm, context):
        self.calls.append((context.role, self.options.label))
        return PassResult(gm, modified=False)


class RecordModule(ModulePass[LabelOptions]):
    """Record which model it ran on, with its option; changes nothing."""

    name = "record_module"
    calls: ClassVar[list[tuple[str, str]]] = []

    def __call__(self, module, context):
        self.calls.append((context.role, self.options.label))
        return module


class Recorders:
    @hookimpl
    def compressor_graph_passes(self):
        return [RecordGraph]

    @hookimpl
    def compressor_module_passes(self):
        return [RecordModule, ReluToGelu]


def test_a_pass_listed_twice_runs_each_entry_on_its_targets_and_the_notes_say_so(write_recipe):
    text = FAST_RECIPE + textwrap.dedent("""\
        passes:
          - {name: record_graph, label: a, target: student}
          - {name: record_graph, label: b, target: teacher}
          - {name: record_graph, label: c, target: both}
        module_passes:
          - {name: record_module, label: x}
          - {name: record_module, label: y, target: both}
          - {name: relu_to_gelu, target: both}
        """)
    RecordGraph.calls.clear()
    RecordModule.calls.clear()
    plan = build_plan(load_recipe(write_recipe(text)), Registry.load(extra=(Recorders(),)))
    # module passes in recipe order, `both` on the teacher and then the student
    assert RecordModule.calls == [("student", "x"), ("teacher", "y"), ("student", "y")]
    for graph in (plan.student_graph, plan.teacher_graph):  # relu_to_gelu reached both
        targets = {str(n.target) for n in graph.graph.nodes}
        assert any("gelu" in t for t in targets) and not any("relu" in t for t in targets)
    # graph passes: each entry on its role, in recipe order (the student has two graphs)
    student = [label for role, label in RecordGraph.calls if role == "student"]
    teacher = [label for role, label in RecordGraph.calls if role == "teacher"]
    assert student == ["a", "c", "a", "c"] and teacher == ["b", "c"]
    assert (
        "student: passes entry 'record_graph' runs 2 times, in recipe order (passes[0], passes[2])"
        in plan.notes
    )
    repeated = [n for n in plan.notes if " runs 2 times" in n]
    assert len(repeated) == 3  # the teacher's module pass `y` ran once: no note
    assert "student: module_passes entry 'record_module' runs 2 times" in " ".join(repeated)


def test_module_passes_and_recipe_checks_from_a_plugin(write_recipe):
    registry = Registry.load(extra=(RecipeRules(),))
    path = write_recipe(FAST_RECIPE + "module_passes:\n  - name: relu_to_gelu\n")
    plan = build_plan(load_recipe(path), registry)
    targets = {str(n.target) for n in plan.student_graph.graph.nodes}
    assert any("gelu" in t for t in targets) and not any("relu" in t for t in targets)
    teacher_targets = {str(n.target) for n in plan.teacher_graph.graph.nodes}
    assert any("relu" in t for t in teacher_targets)  # target: student only
    with pytest.raises(RecipeErrors, match="seed must be even in this lab"):
        build_plan(load_recipe(path, ["seed=1"]), registry)
