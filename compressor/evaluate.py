"""Eval metrics by task: what "better" means for a classifier, a language model, an encoder.

- classification: accuracy and cross entropy of logits [B, C].
- language-modeling: next-token cross entropy and perplexity of logits [B, T, V] against
  per-token labels [B, T] (-100 = not scored: padding, prompts).
- embedding: agreement with a reference encoder (the teacher) on mean-pooled sentence
  embeddings: mean cosine (same width only), Spearman correlation of all pairwise
  similarities, and top-1 retrieval agreement (same nearest neighbour).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor.hf import mean_pool
from compressor.loading import DataBundle, call_model, collate

IGNORE = -100  # label of tokens that are not scored


def evaluate(
    model: nn.Module,
    data: DataBundle,
    batch_size: int,
    device: torch.device,
    reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of `model` (an eval-form graph, or a module switched to eval) on `data.eval`.

    `reference` holds the reference embeddings for the embedding task (`embeddings(...)` of
    the teacher); without it that task has no metrics."""
    was_training = model.training
    if not isinstance(model, fx.GraphModule):  # exported graphs have their mode baked in
        model.eval()
    try:
        with torch.no_grad():
            if data.task == "embedding":
                if reference is None:
                    return {}
                try:
                    own = embeddings(model, data.eval, batch_size, device)
                except NotAnEncoder:  # e.g. a classifier in a general-distillation stage
                    return {}
                return embedding_agreement(own, reference)
            return _score(model, data, batch_size, device)
    finally:
        if not isinstance(model, fx.GraphModule):
            model.train(was_training)


def _score(
    model: nn.Module, data: DataBundle, batch_size: int, device: torch.device
) -> dict[str, float]:
    correct, loss_sum, count = 0, 0.0, 0
    dataset = data.eval
    for start in range(0, len(dataset), batch_size):
        x, y = collate(dataset, range(start, min(start + batch_size, len(dataset))), device)
        logits = call_model(model, x).float()
        if data.task == "language-modeling":
            logits, y = logits[:, :-1].flatten(0, 1), y[:, 1:].flatten()
        scored = y != IGNORE
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE))
        correct += int(((logits.argmax(-1) == y) & scored).sum())
        count += int(scored.sum())
    mean = loss_sum / max(count, 1)
    if data.task == "language-modeling":
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": correct / count}
    return {"accuracy": correct / count, "loss": mean}


class NotAnEncoder(ValueError):
    pass


def embeddings(model: Any, dataset: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """Mean-pooled sentence embeddings [N, D] of a model that returns token states."""
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            x, _ = collate(dataset, range(start, min(start + batch_size, len(dataset))), device)
            assert isinstance(x, dict), "embeddings need named text inputs"
            states = call_model(model, x).float()
            if states.dim() != 3:  # a classifier's logits: no token states to pool
                raise NotAnEncoder(f"the model returns {tuple(states.shape)}, not token states")
            out.append(mean_pool(states, x["attention_mask"]).cpu())
    return torch.cat(out)


def embedding_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    from scipy.stats import spearmanr

    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    s_sim, t_sim = s @ s.T, t @ t.T
    upper = torch.triu_indices(len(s), len(s), offset=1)
    rho = spearmanr(s_sim[upper[0], upper[1]].numpy(), t_sim[upper[0], upper[1]].numpy())
    eye = torch.eye(len(s), dtype=torch.bool)
    nearest_s = s_sim.masked_fill(eye, -2).argmax(1)
    nearest_t = t_sim.masked_fill(eye, -2).argmax(1)
    out = {
        "spearman": float(rho.statistic),
        "top1_agreement": float((nearest_s == nearest_t).float().mean()),
    }
    if s.shape[1] == t.shape[1]:
        out["cosine"] = float((s * t).sum(-1).mean())
    return out
