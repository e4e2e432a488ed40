"""`prune_vocab`: a student that keeps only the tokens its text uses.

A sentence encoder's embedding table is often half its weights (all-MiniLM-L6-v2: 11.7M of
22.7M parameters for 30,522 tokens), and most rows are tokens the student's domain never
shows. This module pass keeps the tokens of the recipe's training text (plus `extra_text`
files, the special tokens, and the pieces words fall back to; with `min_count`, only the
tokens used that often), gathers those rows of the embedding table, and rebuilds the
tokenizer over the kept vocabulary, so the exported Hugging Face folder tokenises raw text
into the new ids by itself: a word whose pieces were dropped falls back to smaller kept pieces
(WordPiece: the single-character and `##` pieces of every character the text uses are kept;
byte-level BPE: the 256 byte tokens and every token a kept token is merged from), else to the
unknown token.

The recipe's data stay in the teacher's ids, which both models read: the student maps them
to its own through a `vocab_map` buffer (teacher id -> student id; a dropped token -> the
first kept piece of its spelling in BPE, the unknown token in WordPiece) at the start of its
forward. With `min_count: 1` the training text is fully
covered, so the map is exact there. Exporters that write a graph keep the map (the file reads
teacher ids); the `hf` folder drops it (its model reads the ids of its own tokenizer).

A causal LM's head is pruned to the same rows (a tied head stays tied to the new table).
Both models' next-token distributions then cover the kept tokens: the teacher returns its
logits at the kept ids (`HFModule.read_logits_over`; its softmax renormalised over them, which
`kd`, its fused head and the teacher cache all read), and the data's labels are renumbered to
the student's ids (`DataBundle.target_map`; a dropped token is not scored).

Supported: fast tokenizers whose model is WordPiece (BERT family) or BPE (GPT-2, Llama 3,
SmolLM2, Qwen2), on encoders, classifiers and causal LMs whose head is an nn.Linear.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compressor.api import IGNORE, ModulePass, ModulePassContext, hookimpl
from compressor.plugins.hf import VOCAB_MAP, HFModule, mean_pool

SUPPORTED_MODELS = ("WordPiece", "BPE")


class PruneVocabOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    extra_text: list[str] = Field(
        default_factory=list,
        description="text files (relative to the recipe) whose tokens are kept as well",
    )
    min_count: int = Field(
        1,
        ge=1,
        description="keep a token the text uses at least this often (above 1, rarer ones read "
        "as a stand-in in training (BPE: their first kept piece; WordPiece: unknown) and fall "
        "back to pieces in the exported tokenizer)",
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="keep at most this many tokens: the special tokens and fallback pieces, "
        "then the most used (a budget for the embedding table); the rest read as with "
        "min_count",
    )
    fallback_pieces: Literal["seen", "all", "none"] = Field(
        "seen",
        description="single-character pieces unseen words fall back to (WordPiece): those of "
        "the characters the text uses, all of them, or none; byte-level BPE keeps its byte "
        "tokens unless none",
    )


class PruneVocab(ModulePass[PruneVocabOptions]):
    """Keep the embedding rows and tokenizer entries of the tokens the training text uses."""

    name = "prune_vocab"

    def __call__(self, module: nn.Module, context: ModulePassContext) -> nn.Module:
        student = _checked_student(module, context)
        assert context.data is not None
        causal = student.task == "causal-lm"
        tokenizer = student.tokenizer
        counts = self._counts(tokenizer, context)
        used = {i for i, n in counts.items() if n >= self.options.min_count}
        keep = self._kept(tokenizer, used, counts)
        used &= set(keep)
        old_size = student.hf_model.get_input_embeddings().weight.shape[0]
        before = sum(p.numel() for p in student.parameters())
        # the first eval samples, in the teacher's ids: read before and after pruning
        sample = _eval_sample(context.data, next(student.parameters()).device)
        held_out = _outputs(student, sample, keep if causal else None)
        student.tokenizer = prune_tokenizer(tokenizer, keep)
        _prune_embeddings(student, keep, tokenizer)
        stand_in = "their first kept piece" if _is_bpe(tokenizer) else "unknown"
        after = sum(p.numel() for p in student.parameters())
        kept = set(keep)
        if causal:  # both models' next-token distributions cover the kept tokens
            _read_kept_tokens(context, keep, old_size)
            # text retokenised by its own tokenizer has other positions: compared on the data's
            moved = (
                "changes the student's top-1 next token at "
                f"{_distance(held_out, _outputs(student, sample))} of the positions "
                f"(dropped tokens read as {stand_in}, as training reads them)"
            )
        else:
            own_text = _outputs_of_own_text(student, sample, tokenizer)
            moved = (
                f"moves the student's outputs by {_distance(held_out, own_text)} through its own "
                "tokenizer (dropped words in kept pieces, as the exported folder reads raw "
                "text), "
                f"{_distance(held_out, _outputs(student, sample))} with dropped tokens read as "
                f"{stand_in} (as training reads them)"
            )
        context.notes.append(
            f"prune_vocab: kept {len(keep):,} of {old_size:,} tokens ({len(used):,} of the "
            f"{len(counts):,} the training text uses; {_share_out(counts, kept)} of its tokens "
            f"read as {stand_in}); parameters {before:,} -> {after:,} "
            f"({(before - after) * 4 / 2**20:.1f} MiB less in fp32); on the eval text it covers "
            f"{_share_in(_token_counts(context.data, 'eval'), kept)} of the tokens and {moved}"
        )
        return student

    def _counts(self, tokenizer: Any, context: ModulePassContext) -> dict[int, int]:
        """How often each token id occurs in the training data and the extra text files."""
        assert context.data is not None
        counts = _token_counts(context.data, "train")
        for name in self.options.extra_text:
            path = context.folder / name
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"extra_text {name!r}: cannot read {path} as text ({exc})"
                ) from None
            for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
                counts[i] = counts.get(i, 0) + 1
        return counts

    def _kept(self, tokenizer: Any, used: set[int], counts: dict[int, int]) -> list[int]:
        """`kept_ids` of the most used tokens that fit `max_tokens` with what every pruned
        vocabulary keeps (special tokens, fallback pieces, BPE's merge parts)."""
        o = self.options
        ranked = sorted(used, key=lambda i: (-counts[i], i))

        def kept(n: int) -> list[int]:
            return kept_ids(tokenizer, ranked[:n], o.fallback_pieces, text_ids=counts)

        everything = kept(len(ranked))
        if o.max_tokens is None or len(everything) <= o.max_tokens:
            return everything
        if len(floor := kept(0)) > o.max_tokens:
            raise ValueError(
                f"max_tokens {o.max_tokens} is below the {len(floor):,} tokens every pruned "
                "vocabulary of this text keeps (special tokens and the pieces words fall back "
                f"to): at least {len(floor):,}, or fallback_pieces: none"
            )
        fits, over = 0, len(ranked)  # the kept set grows with n: bisect for the largest fit
        while over - fits > 1:
            mid = (fits + over) // 2
            fits, over = (mid, over) if len(kept(mid)) <= o.max_tokens else (fits, mid)
        return kept(fits)


def _checked_student(module: nn.Module, context: ModulePassContext) -> HFModule:
    """The student, when prune_vocab can prune it: a Hugging Face model with the teacher's
    tokenizer (and, for a causal LM, a Hugging Face teacher), not pruned yet, with data."""
    if context.role != "student":
        raise ValueError("prune_vocab rewrites the student only (the teacher keeps its ids)")
    if not isinstance(module, HFModule) or module.tokenizer is None:
        raise ValueError(
            "prune_vocab needs a Hugging Face model with its tokenizer (loader: hf, or "
            f"student: {{from_teacher: true}}), got {type(module).__name__}"
        )
    if module.task == "causal-lm" and not isinstance(context.teacher, HFModule):
        raise ValueError(
            "prune_vocab on a causal LM needs its teacher (a Hugging Face causal LM): the "
            "teacher's logits are read over the kept tokens"
        )
    if module.teacher_id_map is not None:
        raise ValueError("prune_vocab runs once: this student's vocabulary is pruned already")
    teacher_tokenizer = getattr(context.teacher, "tokenizer", None)
    if (
        teacher_tokenizer is not None
        and teacher_tokenizer.get_vocab() != module.tokenizer.get_vocab()
    ):
        raise ValueError(
            "prune_vocab keeps the teacher's ids the data use, so the student must start "
            "with the teacher's tokenizer; theirs differ (a student with student: "
            "{from_teacher: true}, or a folder with the teacher's tokenizer)"
        )
    if context.data is None:
        raise ValueError("prune_vocab needs the recipe's data: it keeps what the text uses")
    return module


def _read_kept_tokens(context: ModulePassContext, keep: list[int], old_size: int) -> None:
    """A causal LM: the teacher's logits over the kept tokens, labels in the kept ids."""
    assert isinstance(context.teacher, HFModule) and context.data is not None
    context.teacher.read_logits_over(keep)
    labels = torch.full((old_size,), IGNORE, dtype=torch.long)
    labels[torch.tensor(keep)] = torch.arange(len(keep))
    context.data.target_map = labels
    context.notes.append(
        "prune_vocab: the teacher's logits are read over the kept tokens (its "
        "distribution renormalised over them) and labels are the kept tokens' ids; a "
        "dropped token is not scored as a label"
    )


def kept_ids(
    tokenizer: Any,
    used: Iterable[int],
    fallback_pieces: str = "seen",
    text_ids: Iterable[int] | None = None,
) -> list[int]:
    """The teacher ids to keep, ascending: `used`, the special and added tokens, the
    single-character pieces unseen words fall back to (`fallback_pieces`: of the characters
    in `text_ids` (default `used`), all, or none), and for BPE every token a kept token is
    merged from (a merge needs its parts)."""
    used = set(used)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] not in SUPPORTED_MODELS:
        raise ValueError(
            f"prune_vocab rebuilds WordPiece and BPE tokenizers; this one's model is "
            f"{model['type']!r} ({type(tokenizer).__name__})"
        )
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    keep = used | set(tokenizer.all_special_ids)
    keep |= {t["id"] for t in state.get("added_tokens", [])}
    if fallback_pieces != "none":
        prefix = model.get("continuing_subword_prefix") or ""

        def bare(token: str) -> str:
            return token[len(prefix) :] if prefix and token.startswith(prefix) else token

        spelled = used if text_ids is None else set(text_ids)
        characters = {c for i in spelled if i in by_id for c in bare(by_id[i])}
        for token, i in vocab.items():
            piece = bare(token)
            # byte-level BPE: single characters are its byte alphabet, always kept
            wanted = fallback_pieces == "all" or model["type"] == "BPE" or piece in characters
            if len(piece) == 1 and wanted:
                keep.add(i)
    if model["type"] == "BPE":  # the parts of every kept token, recursively
        # the first merge that makes a token is the one BPE applies: reversed, it wins
        parts = {a + b: (a, b) for a, b in (_pair(m) for m in reversed(model["merges"]))}
        todo = [by_id[i] for i in keep if i in by_id]
        while todo:
            token = todo.pop()
            for part in parts.get(token, ()):
                if vocab[part] not in keep:
                    keep.add(vocab[part])
                    todo.append(part)
    return sorted(keep)


def prune_tokenizer(tokenizer: Any, keep: list[int]) -> Any:
    """A fast tokenizer over the tokens `keep` (teacher ids, ascending), numbered 0..n-1 in
    that order: same normalisation, pre-tokenisation, special tokens and templates."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(keep)}
    model = state["model"]
    model["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    if model["type"] == "BPE":  # a merge stays when its parts and its result stay
        model["merges"] = [m for m in model["merges"] if _merged(m, model["vocab"])]
    for added in state.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    _renumber_templates(state.get("post_processor"), new_id)
    backend = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side,
        model_input_names=list(tokenizer.model_input_names),
        **tokenizer.special_tokens_map,
    )


def _pair(merge: Any) -> tuple[str, str]:
    """A merge as tokenizer.json writes it: `["a", "b"]` or, in older files, `"a b"`."""
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def _merged(merge: Any, vocab: dict[str, int]) -> bool:
    a, b = _pair(merge)
    return a in vocab and b in vocab and a + b in vocab


def _renumber_templates(node: Any, new_id: dict[int, int]) -> None:
    """Special-token ids inside post-processor templates (BERT's [CLS] ... [SEP])."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [new_id[i] for i in value]
            else:
                _renumber_templates(value, new_id)
    elif isinstance(node, list):
        for item in node:
            _renumber_templates(item, new_id)


def _prune_embeddings(module: HFModule, keep: list[int], teacher_tokenizer: Any) -> None:
    """Gather the kept rows of the input embeddings (and of a causal LM's head), renumber the
    config's token ids, and install the teacher -> student map."""
    model = module.hf_model
    index = torch.tensor(keep)
    old = model.get_input_embeddings()
    new_id = {old_id: new for new, old_id in enumerate(keep)}
    padding = getattr(old, "padding_idx", None)
    table = nn.Embedding(
        len(keep),
        old.weight.shape[1],
        padding_idx=new_id.get(padding) if padding is not None else None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        table.weight.copy_(old.weight[index])
    if module.task == "causal-lm":
        _prune_head(model, index, old.weight, table)
    model.set_input_embeddings(table)
    model.config.vocab_size = len(keep)
    for config in (model.config, getattr(model, "generation_config", None)):
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value in new_id:
                setattr(config, key, new_id[value])
            elif isinstance(value, list):  # several end-of-sequence tokens
                setattr(config, key, [new_id[v] for v in value if v in new_id])
    unknown = teacher_tokenizer.unk_token_id
    fallback = new_id.get(unknown, new_id.get(teacher_tokenizer.pad_token_id, 0))
    mapping = torch.full((old.weight.shape[0],), fallback, dtype=torch.long)
    for old_id, piece in _first_pieces(module.tokenizer, teacher_tokenizer, new_id).items():
        mapping[old_id] = piece
    mapping[index] = torch.arange(len(keep))
    # not persistent: transformers' checkpoint stays the plain pruned model
    module.register_own_buffer(VOCAB_MAP, mapping.to(old.weight.device))
    module.kept_token_ids = list(keep)


def _first_pieces(pruned: Any, teacher_tokenizer: Any, new_id: dict[int, int]) -> dict[int, int]:
    """For BPE, each dropped token's stand-in: the first kept piece of its own spelling
    (`Ġquantify` -> `Ġquant`), so text keeps its positions and reads as a word's start rather
    than the unknown token, which in byte-level BPE is often the end of a document. WordPiece
    models are trained with their unknown token, so they keep it (none here)."""
    if not _is_bpe(teacher_tokenizer):
        return {}
    model = pruned.backend_tokenizer.model
    first = {}
    for token, old_id in teacher_tokenizer.get_vocab().items():
        if old_id not in new_id:
            pieces = model.tokenize(token)
            if pieces:
                first[old_id] = pieces[0].id
    return first


def _is_bpe(tokenizer: Any) -> bool:
    return type(tokenizer.backend_tokenizer.model).__name__ == "BPE"


def _prune_head(
    model: Any, index: torch.Tensor, embedding: torch.Tensor, table: nn.Embedding
) -> None:
    """Keep the rows `index` of a causal LM's head: the new embedding table itself when the
    head is tied to it (SmolLM2, GPT-2), else its own rows and bias."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"prune_vocab prunes a causal LM's head when it is an nn.Linear over the vocabulary; "
            f"{type(model).__name__}'s is {type(head).__name__}"
        )
    pruned = nn.Linear(
        head.in_features,
        len(index),
        bias=head.bias is not None,
        device=head.weight.device,
        dtype=head.weight.dtype,
    )
    with torch.no_grad():
        if head.weight is embedding:
            pruned.weight = table.weight
        else:
            pruned.weight.copy_(head.weight[index])
        if head.bias is not None:
            pruned.bias.copy_(head.bias[index])
    model.set_output_embeddings(pruned)


def _eval_sample(data: Any, device: torch.device, samples: int = 256) -> Any:
    """The first eval samples' inputs on `device`; None for an empty eval split."""
    n = min(samples, len(data.eval))
    return data.batch("eval", range(n), device)[0] if n else None


def _outputs(module: HFModule, x: Any, logit_ids: list[int] | None = None) -> torch.Tensor | None:
    """The model's outputs on inputs `x` in the teacher's ids, in eval form: sentence
    embeddings (mean-pooled token states), or for a causal LM its top-1 next token at each
    position (-1 at padding), over `logit_ids` (the kept tokens, before its head is pruned to
    them)."""
    if x is None:
        return None
    index = None if logit_ids is None else torch.tensor(logit_ids, device=x["input_ids"].device)

    def run(part: dict[str, torch.Tensor]) -> torch.Tensor:
        out = module(**part)
        return out if index is None else out.index_select(-1, index)

    return _pooled(module, run, x, reduce=_top1 if module.task == "causal-lm" else mean_pool)


def _top1(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1).masked_fill(~mask.bool(), -1)


def _outputs_of_own_text(module: HFModule, x: Any, teacher_tokenizer: Any) -> torch.Tensor | None:
    """The pruned model's outputs on the text of inputs `x` tokenised by its own tokenizer,
    as its exported folder reads raw text (the text decoded from the teacher's ids, so it is
    the text the unpruned outputs came from, up to the tokenizer's own normalisation)."""
    if x is None:
        return None
    texts = [
        teacher_tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
        for ids, mask in zip(x["input_ids"], x["attention_mask"].bool(), strict=True)
    ]
    own = module.tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=x["input_ids"].shape[1] * 2,
        return_tensors="pt",
    ).to(x["input_ids"].device)

    def run(part: dict[str, torch.Tensor]) -> torch.Tensor:
        out = module.hf_model(
            input_ids=part["input_ids"], attention_mask=part["attention_mask"], return_dict=True
        )
        return getattr(out, module.output_name)

    return _pooled(module, run, {k: own[k] for k in ("input_ids", "attention_mask")})


def _pooled(
    module: nn.Module,
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    x: dict[str, torch.Tensor],
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mean_pool,
    rows: int = 16,
) -> torch.Tensor:
    """`run` on `rows` rows of inputs `x` at a time (a causal LM's logits are [rows, T, V]),
    with `module` in eval form and no gradients; token states are reduced with the attention
    mask (`reduce`: mean-pooled by default)."""
    was_training = module.training
    module.eval()
    parts = []
    try:
        with torch.no_grad():
            for start in range(0, len(x["input_ids"]), rows):
                part = {k: v[start : start + rows] for k, v in x.items()}
                out = run(part).float()
                parts.append(reduce(out, part["attention_mask"]) if out.dim() == 3 else out)
    finally:
        module.train(was_training)
    return torch.cat(parts)


def _distance(before: torch.Tensor | None, after: torch.Tensor | None) -> str:
    """How far pruning moved the outputs: the mean of 1 - cosine over samples, or for top-1
    tokens the share of positions where it changed."""
    if before is None or after is None:
        return "n/a (no eval text)"
    if not before.is_floating_point():
        real = before >= 0
        changed = float((before != after)[real].float().mean()) if real.any() else 0.0
        return f"{changed:.2%}"
    cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    return f"1 - cosine = {float((1 - cosine).mean()):.4f} on average"


def _share_in(counts: dict[int, int], kept: set[int]) -> str:
    """The share of the text's tokens that are kept."""
    total = sum(counts.values())
    return f"{sum(n for i, n in counts.items() if i in kept) / total:.2%}" if total else "n/a"


def _share_out(counts: dict[int, int], kept: set[int]) -> str:
    total = sum(counts.values())
    return f"{sum(n for i, n in counts.items() if i not in kept) / total:.2%}" if total else "n/a"


def _token_counts(data: Any, split: str) -> dict[int, int]:
    """How often each id occurs among the real tokens of a split (padding left out)."""
    dataset = data.train if split == "train" else data.eval
    counts: dict[int, int] = {}
    for start in range(0, len(dataset), 512):
        x, _ = data.batch(split, range(start, min(start + 512, len(dataset))), torch.device("cpu"))
        if not isinstance(x, dict) or "input_ids" not in x:
            raise ValueError("prune_vocab needs tokenised text (batches with input_ids)")
        ids = x["input_ids"]
        mask = x.get("attention_mask")
        real = ids[mask.bool()] if mask is not None else ids.flatten()
        values, numbers = real.unique(return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + number
    return counts


@hookimpl
def compressor_module_passes() -> list[type]:
    return [PruneVocab]
