"""Preference distillation (LLaVA-MoD's second stage): DPO with the teacher as reference.

- `preference` data: pairs of a prompt with a chosen and a rejected response, from a jsonl
  of `prompt` / `chosen` / `rejected` rows, or built from the recipe's prose: a sentence's
  first `prompt_tokens` tokens as the prompt, the teacher's greedy continuation as chosen and
  a continuation sampled (at `temperature`) from the student as loaded (a `from_teacher`
  student: the teacher) as rejected. A batch of B pairs is 2B rows, the chosen responses
  first; labels score only the response tokens.
- `dpo` loss: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))),
  pi the student, ref the frozen teacher, log-probabilities summed over response tokens;
  `form: kto_pair` is the KTO pair loss LLaVA-MoD's script runs.
- `preference` evaluator: how often the student gives the chosen response the higher
  log-probability, against the teacher's rate on the same pairs, and the DPO reward accuracy
  (the student's margin over the teacher's).
"""

from __future__ import annotations

import json
import random
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import default_collate

from compressor.api import (
    IGNORE,
    Batch,
    DataBundle,
    DataLoader,
    DataSpec,
    Evaluator,
    LossInputs,
    LossTerm,
    NoOptions,
    Recipe,
    RecipeError,
    call_model,
    hookimpl,
)
from compressor.plugins.hf_loaders import hf_options, load_tokenizer, model_location, trim_columns
from compressor.plugins.text_corpora import prose_sentences

TASK = "preference"


class PreferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(
        "prose", description="a .jsonl of prompt/chosen/rejected rows, or prose (pairs built)"
    )
    max_length: int = Field(64, gt=2, description="tokens of prompt + response")
    limit: int | None = Field(None, gt=1, description="use at most this many pairs")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    prompt_tokens: int = Field(8, gt=0, description="prose: tokens of each prompt")
    response_tokens: int = Field(16, gt=0, description="prose: tokens of each continuation")
    temperature: float = Field(1.0, gt=0, description="prose: of the rejected sample")
    seed: int = Field(0, description="prose: of the samples")


class PreferenceData(DataLoader[PreferenceOptions]):
    """Prompt / chosen / rejected pairs, tokenised with the teacher's tokenizer."""

    name = TASK

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        o = self.options
        teacher = hf_options(recipe.teacher)
        if teacher is None or teacher.task != "causal-lm":
            raise RecipeError(
                recipe.locate(("teacher",)),
                "preference data needs a causal LM teacher loaded with loader: hf (its "
                "tokenizer, and its log-probabilities as the DPO reference)",
            )
        folder, gguf = model_location(teacher, recipe, ("teacher",))
        tokenizer = load_tokenizer(folder, gguf)
        where = recipe.locate(("data", "kwargs", "source"))
        if o.source == "prose":
            pairs = self._prose_pairs(recipe, tokenizer, (folder, gguf))
        else:
            pairs = self._jsonl_pairs(recipe, where)
        order = list(range(len(pairs)))
        random.Random(o.split_seed).shuffle(order)
        if o.limit is not None:
            order = order[: o.limit]
        n_eval = max(1, round(len(order) * o.eval_fraction))
        if len(order) - n_eval < 1:
            raise RecipeError(where, f"{len(order)} preference pairs leave none to train on")
        train, eval_ = (
            [self._item(tokenizer, *pairs[i]) for i in part]
            for part in (order[n_eval:], order[:n_eval])
        )
        return DataBundle(train, eval_, TASK, collate_fn=collate_pairs)

    def _jsonl_pairs(self, recipe: Recipe, where: Any) -> list[tuple[str, str, str]]:
        o = self.options
        file = recipe.resolve(o.source)
        if file.suffix != ".jsonl" or not file.is_file():
            raise RecipeError(where, f"preference file not found: {file}", "prose, or a .jsonl")
        fields = (o.prompt_field, o.chosen_field, o.rejected_field)
        pairs = []
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                pairs.append(tuple(str(item[f]) for f in fields))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RecipeError(
                    where,
                    f"{file}:{number}: not a JSON object with {', '.join(map(repr, fields))}: "
                    f"{exc!r}",
                ) from None
        if len(pairs) < 2:
            raise RecipeError(where, f"{file} has {len(pairs)} preference pairs; need 2 or more")
        return pairs  # type: ignore[return-value]

    def _prose_pairs(
        self, recipe: Recipe, tokenizer: Any, teacher_at: tuple[Any, str | None]
    ) -> list[tuple[str, str, str]]:
        """Prompts from prose sentences; chosen: the teacher's greedy continuation; rejected:
        the student's sampled one."""
        import transformers

        o = self.options
        student = hf_options(recipe.student)
        sampler_at = teacher_at
        if student is not None and not recipe.student.from_teacher:
            sampler_at = model_location(student, recipe, ("student",))

        def load(at: tuple[Any, str | None]) -> Any:
            folder, gguf = at
            kwargs = {"gguf_file": gguf} if gguf else {}
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, **kwargs
            ).eval()

        wanted = o.limit or 256
        prompts = []
        for sentence in prose_sentences():
            ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            if len(ids) > o.prompt_tokens:
                prompts.append(ids[: o.prompt_tokens])
            if len(prompts) == wanted:
                break
        teacher = load(teacher_at)
        sampler = teacher if sampler_at == teacher_at else load(sampler_at)
        torch.manual_seed(o.seed)
        pairs = []
        common = dict(
            max_new_tokens=o.response_tokens,
            min_new_tokens=o.response_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.no_grad():
            for start in range(0, len(prompts), 32):
                ids = torch.tensor(prompts[start : start + 32])
                mask = torch.ones_like(ids)
                chosen = teacher.generate(
                    input_ids=ids, attention_mask=mask, do_sample=False, **common
                )
                rejected = sampler.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=o.temperature,
                    top_k=0,
                    **common,
                )
                for p, c, r in zip(ids, chosen, rejected, strict=True):
                    cut = len(p)
                    pairs.append(
                        (
                            tokenizer.decode(p),
                            tokenizer.decode(c[cut:]),
                            tokenizer.decode(r[cut:]),
                        )
                    )
        return pairs

    def _item(self, tokenizer: Any, prompt: str, chosen: str, rejected: str) -> Any:
        """([2, T] ids and mask, [2, T] labels): chosen then rejected, responses scored."""
        length = self.options.max_length
        eos = tokenizer.eos_token_id

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        head = ids(prompt)[: length - 1]  # at least one response token is scored
        rows, masks, labels = [], [], []
        for response in (chosen, rejected):
            answer = ids(response) + ([eos] if eos is not None else [])
            tokens = (head + answer)[:length]
            scored = ([IGNORE] * len(head) + answer)[:length]
            pad = length - len(tokens)
            rows.append(tokens + [tokenizer.pad_token_id] * pad)
            masks.append([1] * len(tokens) + [0] * pad)
            labels.append(scored + [IGNORE] * pad)
        return (
            {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)},
            torch.tensor(labels),
        )


def collate_pairs(items: list[Any]) -> Batch:
    """B pairs -> 2B rows, the chosen responses first, padding columns trimmed."""
    inputs, target = default_collate(items)  # [B, 2, T]
    inputs = {k: v.transpose(0, 1).flatten(0, 1) for k, v in inputs.items()}
    return trim_columns(inputs, target.transpose(0, 1).flatten(0, 1))


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows] summed log-probabilities of the scored (response) tokens; position t predicts
    token t + 1."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    scored = labels != IGNORE
    picked = torch.gather(F.log_softmax(logits, -1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(
        -1
    )
    return (picked * scored).sum(-1)


def halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) of a [2B] batch."""
    pairs = values.shape[0] // 2
    return values[:pairs], values[pairs:]


class DPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="how far from the reference the student may move")
    form: Literal["sigmoid", "kto_pair"] = "sigmoid"


class DPO(LossTerm[DPOOptions]):
    """Direct preference optimisation against the teacher as the reference model."""

    name = "dpo"

    def units(self, batch: Any, target: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor(float(target.shape[0] // 2 if target is not None else 1))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        target = inputs.target
        if target is None or target.dim() != 2:
            raise ValueError("dpo needs preference data: rows of chosen then rejected responses")
        policy_c, policy_r = halves(response_logprobs(inputs.student["output"], target))
        with torch.no_grad():
            ref_c, ref_r = halves(response_logprobs(inputs.teacher["output"], target))
        chosen, rejected = policy_c - ref_c, policy_r - ref_r
        beta = self.options.beta
        if self.options.form == "sigmoid":
            return -F.logsigmoid(beta * (chosen - rejected)).mean()
        # KTO pair (as in TRL's kto_pair): each side against the other's batch-mean KL
        chosen_kl = chosen.mean().clamp(min=0)
        rejected_kl = rejected.mean().clamp(min=0)
        return torch.cat(
            [
                1 - torch.sigmoid(beta * (chosen - rejected_kl)),
                1 - torch.sigmoid(beta * (chosen_kl - rejected)),
            ]
        ).mean()


class PreferenceEvaluator(Evaluator[NoOptions]):
    """How often a model gives the chosen response the higher log-probability."""

    name = TASK
    primary = "preference_accuracy"

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        teacher = self.context.teacher
        prefers, teacher_prefers, reward, pairs = 0.0, 0.0, 0.0, 0.0
        for start in self.batch_starts():
            x, y = self.batch(start)
            with torch.no_grad():
                c, r = halves(response_logprobs(call_model(model, x), y))
                prefers += float((c > r).sum())
                if teacher is not None:
                    tc, tr = halves(response_logprobs(call_model(teacher, x), y))
                    teacher_prefers += float((tc > tr).sum())
                    reward += float(((c - tc) > (r - tr)).sum())
            pairs += len(c)
        prefers, teacher_prefers, reward, pairs = self.shard.sum(
            torch.tensor([prefers, teacher_prefers, reward, pairs], dtype=torch.float64)
        ).tolist()
        metrics = {"preference_accuracy": prefers / max(pairs, 1)}
        if teacher is not None:
            metrics["teacher_preference_accuracy"] = teacher_prefers / max(pairs, 1)
            metrics["reward_accuracy"] = reward / max(pairs, 1)
        return metrics

    def chance(self) -> float | None:
        return 0.5


@hookimpl
def compressor_data_loaders() -> list[type]:
    return [PreferenceData]


@hookimpl
def compressor_losses() -> list[type]:
    return [DPO]


@hookimpl
def compressor_evaluators() -> list[type]:
    return [PreferenceEvaluator]
