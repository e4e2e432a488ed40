"""examples/plugin, the package docs/plugins.md is written around: its code is what the page
shows, and installed from outside the repository each of its components works in a recipe."""

from __future__ import annotations

import csv
import importlib
import json
import re
import subprocess
from pathlib import Path

import onnx
import pytest
import torch
from conftest import ROOT, install_outside, run_compress

from compressor.graph_pass import PassContext
from compressor.testing import check_pass

EXAMPLE = ROOT / "examples" / "plugin"
SOURCE = EXAMPLE / "compressor_example_plugin.py"


def _sections() -> dict[str, str]:
    text = SOURCE.read_text()
    parts = re.split(r"^(# -- .*)$", text, flags=re.M)
    sections = {"imports": parts[0][parts[0].index("from __future__") :].rstrip() + "\n"}
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        sections[title.strip("# -").strip()] = (title + body).rstrip() + "\n"
    return sections


def test_every_code_block_of_the_plugin_guide_is_the_example_file():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    shown = re.findall(r"<!-- example: (.+?) -->\n```python\n(.*?)```\n", doc, flags=re.S)
    sections = _sections()
    assert {title for title, _ in shown} == set(sections), "every section is shown, once"
    for title, code in shown:
        assert code == sections[title], f"docs/plugins.md shows another {title!r} than the file"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_outside(EXAMPLE, tmp_path_factory.mktemp("site"))


def _compress(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_compress(*args, cwd=cwd, path=(site,), autoload=True)


def _digits_csv(path: Path) -> Path:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"p{i}" for i in range(64)] + ["label"])
        writer.writerows(
            [*(v / 16 for v in x), int(y)] for x, y in zip(images, labels, strict=True)
        )
    return path


def test_the_installed_example_plugin_runs_the_example_recipe(site, tmp_path):
    listing = _compress(site, tmp_path, "plugins")
    assert "example  (compressor-example-plugin 1.0.0; compressor_example_plugin)" in listing.stdout
    assert "      attention_transfer: Attention transfer: distance of normalised" in listing.stdout

    data = _digits_csv(tmp_path / "digits.csv")
    recipe = str(EXAMPLE / "recipe.yaml")
    overrides = [f"data.kwargs.path={data}", f"output={tmp_path / 'run'}", "train.steps=60"]
    validate = _compress(site, tmp_path, "validate", recipe, *overrides)
    assert validate.returncode == 0, validate.stderr
    assert "student: input_noise: noise sigma 0.05 on x" in validate.stdout

    done = _compress(site, tmp_path, recipe, *overrides, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [loss["name"] for loss in report["losses"]] == ["kd", "ce", "attention_transfer"]
    exports = {e["exporter"]: e for e in report["exports"]}
    assert exports["torchscript"]["ok"] and exports["onnx"]["ok"]
    assert report["models"]["student"]["latency_ms"]["torchscript"]["32"] > 0
    # the noise is scaffolding: the shipped student is deterministic and has no random op
    ops = {node.op_type for node in onnx.load(exports["onnx"]["path"]).graph.node}
    assert not any("Random" in op for op in ops)
    shipped = torch.jit.load(exports["torchscript"]["path"])
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(shipped(x), shipped(x))

    located = _compress(site, tmp_path, "validate", recipe, *overrides, "student.in_channels=3")
    assert located.returncode == 2
    assert "(student.in_channels): the student takes 3 input channels and the data has 1" in (
        located.stderr
    )
    assert "allowed: in_channels: 1" in located.stderr


def test_the_example_pass_is_checked_like_a_built_in(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    plugin = importlib.import_module("compressor_example_plugin")
    from compressor.capture import capture_module

    student = plugin.CNN(1, [4, 8], 10).train()
    gm = capture_module(student, (torch.rand(4, 1, 8, 8),), "student", "export")
    noisy = check_pass(
        plugin.InputNoise(plugin.NoiseOptions(sigma=0.5)),
        gm,
        PassContext("student"),
        (torch.rand(4, 1, 8, 8),),
        modified=True,
        node_delta=3,
        same_output=False,
    )
    x = torch.rand(4, 1, 8, 8)
    assert not torch.equal(noisy(x), noisy(x))  # noise in training
    teacher = capture_module(student.eval(), (x,), "teacher", "export")
    check_pass(plugin.InputNoise(), teacher, PassContext("teacher"), (x,), modified=False)
