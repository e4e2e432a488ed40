"""Built-in evaluators, one per data task.

- classification: accuracy and cross entropy of logits [B, C].
- language-modeling: next-token cross entropy, perplexity and accuracy of logits [B, T, V]
  against per-token labels [B, T] (-100 = not scored: padding, prompts); with a teacher of
  the same vocabulary, KL(teacher || model) per scored token and top-1 agreement with it.
- embedding: agreement with the teacher on mean-pooled sentence embeddings: mean cosine
  (same width only), Spearman correlation of all pairwise similarities, and top-1 retrieval
  agreement (same nearest neighbour).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.api import IGNORE, EvalContext, Evaluator, NoOptions, call_model, hookimpl
from compressor.plugins.hf import mean_pool


class _TokenScores(Evaluator[NoOptions]):
    """Cross entropy and accuracy of logits against labels (-100 = not scored)."""

    next_token = False
    versus_teacher = False  # also KL(teacher || model) and top-1 agreement with the teacher
    primary = "accuracy"
    label_counts: torch.Tensor | None = None  # of the scored eval labels (the same every time)
    classes = 0

    def setup(self, context: EvalContext) -> None:
        super().setup(context)
        self.label_counts = None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        c = self.context
        correct, loss_sum, count = 0, 0.0, 0
        kl_sum, agree, compared = 0.0, 0, 0
        counting = self.label_counts is None  # the eval labels are counted once
        counts = torch.zeros(0, dtype=torch.long)
        teacher = c.teacher if self.versus_teacher and model is not c.teacher else None
        for start in self.batch_starts():
            x, y = self.batch(start)
            logits = call_model(model, x).float()
            if self.next_token:  # position t predicts token t + 1
                logits, y = logits[:, :-1].flatten(0, 1), y[:, 1:].flatten()
            scored = y != IGNORE
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE))
            predicted = logits.argmax(-1)
            correct += int(((predicted == y) & scored).sum())
            count += int(scored.sum())
            if teacher is not None:
                t_logits = call_model(teacher, x).float()
                t_logits = t_logits[:, :-1].flatten(0, 1) if self.next_token else t_logits
                if t_logits.shape != logits.shape:  # another vocabulary: nothing to compare
                    teacher = None
                else:
                    log_q, log_p = (
                        F.log_softmax(logits[scored], -1),
                        F.log_softmax(t_logits[scored], -1),
                    )
                    kl_sum += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
                    agree += int((predicted[scored] == t_logits[scored].argmax(-1)).sum())
                    compared += int(scored.sum())
                    del log_q, log_p, t_logits
            if counting:
                self.classes = logits.shape[-1]
                seen = torch.bincount(y[scored].cpu(), minlength=self.classes)
                counts = seen if counts.numel() == 0 else counts + seen
        # each rank scored its part: the sums over all of them
        sums = [loss_sum, kl_sum, correct, count, agree, compared, teacher is not None]
        loss_sum, kl_sum, *tallies = self.shard.sum(
            torch.tensor(sums, dtype=torch.float64)
        ).tolist()
        correct, count, agree, compared, with_teacher = (int(v) for v in tallies)
        if with_teacher < self.shard.size:  # one rank found another vocabulary
            teacher = None
        if counting:
            classes = max(self.shard.gather(self.classes))
            counts = torch.zeros(classes, dtype=torch.long).index_add_(
                0, torch.arange(counts.numel()), counts
            )
            self.classes, self.label_counts = classes, self.shard.sum(counts)
        metrics = self.metrics(loss_sum / max(count, 1), correct / max(count, 1))
        if teacher is not None and compared:
            metrics["kl_to_teacher"] = kl_sum / compared
            metrics["top1_agreement"] = agree / compared
        return metrics

    def metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        return {"accuracy": accuracy, "loss": loss}

    def chance(self) -> float | None:
        """Always answering the commonest label."""
        counts = self.label_counts
        if counts is None or int(counts.sum()) == 0:
            return None
        return float(counts.max()) / float(counts.sum())


class Classification(_TokenScores):
    """Accuracy and cross entropy of class logits."""

    name = "classification"


class LanguageModeling(_TokenScores):
    """Next-token loss, perplexity and accuracy on the scored tokens."""

    name = "language-modeling"
    next_token = True
    versus_teacher = True
    primary = "loss"
    higher_is_better = False

    def chance(self) -> float | None:
        """The loss of a uniform guess over the vocabulary."""
        return math.log(self.classes) if self.classes else None

    def metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": accuracy}


class NotAnEncoder(ValueError):
    pass


def embeddings(model: nn.Module, evaluator: Evaluator[Any]) -> torch.Tensor:
    """Mean-pooled sentence embeddings [N, D] of a model that returns token states (every
    rank's part of the eval set, in order)."""
    out: list[tuple[int, torch.Tensor]] = []
    problem = ""
    for start in evaluator.batch_starts():
        x, _ = evaluator.batch(start)
        if not isinstance(x, dict) or "attention_mask" not in x:
            problem = "embeddings need named text inputs with an attention_mask"
            break
        states = call_model(model, x).float()
        if states.dim() != 3:  # a classifier's logits: no token states to pool
            problem = f"the model returns {tuple(states.shape)}, not token states"
            break
        out.append((start, mean_pool(states, x["attention_mask"]).cpu()))
    parts = evaluator.shard.gather((problem, out))
    problems = [p for p, _ in parts if p]
    if problems:  # every rank says so, together
        raise NotAnEncoder(problems[0])
    return torch.cat([e for _, e in sorted((pair for _, o in parts for pair in o), key=_first)])


def _first(pair: tuple[int, torch.Tensor]) -> int:
    return pair[0]


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


class Embedding(Evaluator[NoOptions]):
    """Agreement of sentence embeddings with the teacher's (cosine, Spearman, top-1)."""

    name = "embedding"
    primary = "spearman"
    _reference: torch.Tensor | None = None

    def chance(self) -> float | None:
        """Similarities unrelated to the teacher's."""
        return 0.0

    def setup(self, context: EvalContext) -> None:
        super().setup(context)
        self._reference = None
        self._tried = False

    def reference(self) -> torch.Tensor | None:
        """The teacher's eval-set embeddings, computed once; None without an encoder teacher
        (a stage that distils a classifier has nothing of this task to score)."""
        teacher = self.context.teacher
        if not self._tried and teacher is not None:
            self._tried = True
            try:
                with torch.no_grad():
                    self._reference = embeddings(teacher, self)
            except NotAnEncoder:
                self._reference = None
        return self._reference

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        reference = self.reference()
        if reference is None:
            return {}
        try:
            own = embeddings(model, self)
        except NotAnEncoder:  # e.g. a classifier in a general-distillation stage
            return {}
        return embedding_agreement(own, reference)


@hookimpl
def compressor_evaluators() -> list[type]:
    return [Classification, LanguageModeling, Embedding]
