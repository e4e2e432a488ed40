"""`hf`: a Hugging Face model folder that optimum.onnxruntime loads like any HF ONNX export.

The folder holds `model.onnx` (inputs named like the HF forward's arguments, output named
as HF does: `last_hidden_state` or `logits`, dynamic batch and sequence axes; a causal LM's
decoder also reads and returns its key/value cache), `config.json`, the tokenizer files,
and the PyTorch weights (`model.safetensors`), so it is also a transformers model folder: a
later recipe can load it as a teacher. Every ONNX file is written from the student graph
and verified in onnxruntime; where optimum is installed (the `optimum` extra), the folder is
also loaded through optimum's ORTModel class for the task and checked again.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from compressor.api import (
    OUTPUT_NAME_META,
    ExportError,
    ExportResult,
    Inputs,
    Runner,
    batch_size,
    call_model,
    eliminate_dead_code,
    hookimpl,
    to_device,
)
from compressor.plugins.hf import LOGIT_IDS, TASKS, VOCAB_MAP, HFModule
from compressor.plugins.hf_decoder import (
    GREEDY_TOKENS,
    check_decoder,
    eos_ids,
    first_prompt,
    optimum_generation,
    optimum_model,
    quiet_optimum,
    write_decoder,
)
from compressor.plugins.hf_moe import checkpoint_model, kv_heads
from compressor.plugins.onnx_export import (
    ONNXExporter,
    export_onnx,
    ort_runner,
    verify_onnx,
)
from compressor.plugins.onnx_int8 import ONNXInt8Exporter, OrtModule, fed_data_ids, map_ids
from compressor.plugins.ort_decoder import OrtDecoder


class HFExporter(ONNXExporter):
    """ONNX in a Hugging Face folder (config, tokenizer, weights); a causal LM's decoder
    reads and returns past key values, so a runtime's generate() reuses its cache."""

    name = "hf"

    def check(self, module: nn.Module, device: torch.device) -> None:
        _require_hf_module(self.name, module)
        if isinstance(module, HFModule) and module.task == "causal-lm":
            attention = getattr(module.hf_model.config, "_attn_implementation", "eager")
            if attention != "eager":
                raise ValueError(
                    "exporter 'hf' writes a causal LM's cached decoder from the student graph's "
                    f"eager attention; this model was loaded with attn_implementation "
                    f"{attention!r}: leave kwargs.attn_implementation unset (eager)"
                )

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        if not isinstance(module, HFModule):
            raise ExportError(
                f"exporter 'hf' writes Hugging Face folders; the {stem} is a "
                f"{type(module).__name__}, not a model loaded with loader: hf. Use exporter 'onnx'."
            )
        folder = out_dir / f"{stem}-hf"
        path = folder / "model.onnx"
        _write_hf_files(module, folder)
        details: dict[str, Any] = {
            "folder": str(folder),
            "verified_batches": [batch_size(b[0]) for b in verify_inputs],
        }
        own = own_ids(module)  # a pruned vocabulary: the folder reads its tokenizer's ids
        plain = graph if own is None else without_vocab_map(graph)
        if module.logit_token_ids is not None:  # a pruned student's teacher: the folder
            graph = plain = without_logit_read(graph)  # is the whole model, every token's logit
        example_inputs, folder_inputs = own_inputs(own, example_inputs, verify_inputs)
        if own is not None:
            kept = len(module.kept_token_ids or [])
            details["vocabulary"] = f"{kept:,} of the teacher's {own.numel():,} tokens"
        if module.task == "causal-lm":
            diff = self._causal_lm(module, folder, plain, folder_inputs, details)
        else:
            details["inputs"] = export_onnx(plain, example_inputs, path, self.options.opset)
            diff = verify_onnx(plain, path, folder_inputs)
            details["onnxruntime_max_abs_diff"] = diff
            optimum_diff, how = _optimum_check(
                folder, module.task, graph, verify_inputs, folder_inputs=folder_inputs
            )
            details["optimum"] = how
            if optimum_diff is not None:
                details["optimum_max_abs_diff"] = optimum_diff
                diff = max(diff, optimum_diff)
        if own is not None:  # the graph without its map equals the student on its ids
            diff = max(diff, _max_diff(plain, graph, folder_inputs, verify_inputs))
        return ExportResult(self.name, path, diff, self.options.tolerance, details)

    def _causal_lm(
        self,
        module: HFModule,
        folder: Path,
        graph: fx.GraphModule,
        verify_inputs: list[tuple[Inputs, ...]],
        details: dict[str, Any],
    ) -> float:
        """The decoder with a cache, written from the student graph and checked against it
        (`hf_decoder`). Where optimum is installed, the folder must also load in its
        ORTModelForCausalLM and generate the same tokens; a family whose cache optimum's
        loader sizes by attention heads is written again with a key/value head per query
        head, so the folder works where users load it."""
        path = folder / "model.onnx"
        details |= write_decoder(module, graph, path, self.options.opset)
        optimum = optimum_model(folder)
        saved = kv_heads(module.hf_model.config)
        if optimum is not None and optimum.num_key_value_heads != saved:
            details["key_value_heads"] = (
                f"{saved} repeated to {optimum.num_key_value_heads}: optimum's "
                f"ORTModelForCausalLM sizes a {module.hf_model.config.model_type} cache by "
                "its attention heads"
            )
            _write_hf_files(module, folder, repeat_kv_heads=True)
            details |= write_decoder(module, graph, path, self.options.opset, repeat_heads=True)
            optimum = optimum_model(folder)  # the folder changed under it
        checks = check_decoder(path, graph, verify_inputs, eos_ids(module))
        details |= checks
        if optimum is None:
            details["optimum"] = (
                "not checked: optimum is not installed (pip install -e '.[optimum]')"
            )
        elif (
            tokens := optimum_generation(optimum, first_prompt(verify_inputs), GREEDY_TOKENS)
        ) != checks["greedy_tokens"]:
            raise ExportError(
                f"{folder}: optimum's ORTModelForCausalLM generates {tokens[:8]}... where "
                f"onnxruntime with our cache loop generates {checks['greedy_tokens'][:8]}..."
            )
        else:
            details["optimum"] = (
                "loaded with optimum.onnxruntime.ORTModelForCausalLM (defaults); its greedy "
                f"tokens equal ours ({GREEDY_TOKENS})"
            )
        return max(checks["onnxruntime_max_abs_diff"], checks["cached_generation_max_abs_diff"])

    def runner(self, path: Path, providers: list[str] | None = None) -> Runner | None:
        """A decoder with a cache runs on its prompt (an empty cache)."""
        if not OrtDecoder.is_decoder(path):
            return folder_runner(path, providers)
        decoder = OrtDecoder(path, providers)
        to_folder = folder_ids(path.parent)

        def run(inputs: tuple[Inputs, ...]) -> object:
            x = to_folder(inputs)[0]
            assert isinstance(x, dict)
            return decoder.prompt_logits(x["input_ids"].cpu(), x["attention_mask"].cpu())

        return run

    def generation_rate(self, path: Path, prompt: Inputs, new_tokens: int) -> float | None:
        if not OrtDecoder.is_decoder(path):
            return None
        (mine,) = folder_ids(path.parent)((prompt,))  # a pruned vocabulary reads its own ids
        assert isinstance(mine, dict)
        return OrtDecoder(path).tokens_per_second(mine["input_ids"][:1].cpu(), new_tokens)


class HFInt8Exporter(ONNXInt8Exporter):
    """A Hugging Face folder whose model.onnx is int8, loaded by optimum like any export and
    checked by the task metric (encoders and classifiers)."""

    name = "hf_int8"

    def check(self, module: nn.Module, device: torch.device) -> None:
        _require_hf_module(self.name, module)
        if isinstance(module, HFModule) and module.task == "causal-lm":
            raise ValueError(
                "exporter 'hf_int8' quantizes encoders and classifiers; a causal LM's cached "
                "decoder is not quantized here yet: use 'hf' (fp32 with a KV cache)"
            )

    def export(
        self,
        graph: fx.GraphModule,
        example_inputs: tuple[Inputs, ...],
        verify_inputs: list[tuple[Inputs, ...]],
        out_dir: Path,
        stem: str,
        module: nn.Module | None = None,
    ) -> ExportResult:
        assert isinstance(module, HFModule)  # check() refused anything else
        folder = out_dir / f"{stem}-hf-int8"
        _write_hf_files(module, folder)
        # a pruned vocabulary: the folder reads its tokenizer's ids, the data are the teacher's
        own = own_ids(module)
        plain = graph if own is None else without_vocab_map(graph)
        example_inputs, folder_inputs = own_inputs(own, example_inputs, verify_inputs)
        path = folder / "model.onnx"
        result = self.write_int8(plain, example_inputs, folder_inputs, path, own_ids=own)
        # optimum must load the folder and give what onnxruntime gives on the same file
        reference = fed_data_ids(OrtModule(result.path), own)
        diff, how = _optimum_check(
            folder, module.task, graph, verify_inputs, reference, folder_inputs
        )
        if diff is not None and diff > 1e-5:
            raise ExportError(
                f"{folder}: optimum's output differs from onnxruntime's by {diff:.3g}"
            )
        result.details |= {"folder": str(folder), "optimum": how}
        return result

    def runner(self, path: Path, providers: list[str] | None = None) -> Runner | None:
        return folder_runner(path, providers)


def _require_hf_module(exporter: str, module: nn.Module) -> None:
    if not isinstance(module, HFModule):
        raise ValueError(
            f"exporter {exporter!r} writes Hugging Face folders, and the student is a "
            f"{type(module).__name__}, not a model loaded with loader: hf"
        )


def _write_hf_files(module: HFModule, folder: Path, repeat_kv_heads: bool = False) -> None:
    """config.json, the weights and the tokenizer: what makes a folder a model folder (an
    upcycled student's in the Qwen2-MoE layout; a pruned vocabulary's kept teacher ids);
    `repeat_kv_heads`: a key/value head per query head (`checkpoint_model`)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = checkpoint_model(module.hf_model, repeat_kv_heads)
    model.save_pretrained(str(folder), safe_serialization=True)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(str(folder))
    if module.kept_token_ids is not None:
        (folder / KEPT_IDS).write_text(json.dumps(module.kept_token_ids))


# In a pruned student's folder: the teacher id of each of the folder's token ids, so inputs
# tokenised by the teacher (a recipe's data, `compress bench`) can be fed to it.
KEPT_IDS = "teacher_token_ids.json"


def own_ids(module: nn.Module | None) -> torch.Tensor | None:
    """A pruned student's map from the teacher's token ids to its own, else None."""
    return module.teacher_id_map if isinstance(module, HFModule) else None


def own_inputs(
    own: torch.Tensor | None,
    example_inputs: tuple[Inputs, ...],
    verify_inputs: list[tuple[Inputs, ...]],
) -> tuple[tuple[Inputs, ...], list[tuple[Inputs, ...]]]:
    """The export and check inputs in the folder's own token ids."""
    if own is None:
        return example_inputs, verify_inputs
    return (
        tuple(map_ids(x, own) for x in example_inputs),
        [tuple(map_ids(x, own) for x in inputs) for inputs in verify_inputs],
    )


def folder_runner(path: Path, providers: list[str] | None = None) -> Runner:
    """The ONNX file in a Hugging Face folder, run on inputs in the teacher's token ids (a
    pruned vocabulary's folder gets them in its own), on onnxruntime's `providers`."""
    to_folder = folder_ids(path.parent)
    run = ort_runner(path, providers)
    return lambda inputs: run(to_folder(inputs))


def folder_ids(folder: Path) -> Callable[[tuple[Inputs, ...]], tuple[Inputs, ...]]:
    """Turns inputs in the teacher's token ids into the ids the model in `folder` reads
    (returns them unchanged for a folder without a pruned vocabulary). Tokens the folder
    dropped read its id 0: for timing and benchmarks, not for scores."""
    kept = folder / KEPT_IDS
    if not kept.is_file():
        return lambda inputs: inputs
    teacher_ids = torch.tensor(json.loads(kept.read_text()))
    own = torch.zeros(int(teacher_ids.max()) + 2, dtype=torch.long)  # last: any higher id
    own[teacher_ids] = torch.arange(len(teacher_ids))

    def to_folder(inputs: tuple[Inputs, ...]) -> tuple[Inputs, ...]:
        clipped = [
            {**x, "input_ids": x["input_ids"].clamp(max=len(own) - 1)} if isinstance(x, dict) else x
            for x in inputs
        ]
        return tuple(map_ids(x, own) for x in clipped)

    return to_folder


def without_vocab_map(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of a pruned student's graph that reads its own token ids: the lookup of the
    teacher's ids in `vocab_map` bypassed."""
    return _bypassed(
        graph,
        torch.ops.aten.index.Tensor,
        VOCAB_MAP,
        lambda lookup: lookup.args[1][0],  # type: ignore[index]
        f"a pruned student's graph should look its input ids up in {VOCAB_MAP!r} once",
    )


def without_logit_read(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of a causal-LM teacher's graph that returns the logits of every token: the
    read over a pruned student's tokens (`index_select` on `logit_ids`) bypassed."""
    return _bypassed(
        graph,
        torch.ops.aten.index_select.default,
        LOGIT_IDS,
        lambda read: read.args[0],
        f"a pruned student's teacher should read its logits over {LOGIT_IDS!r} once",
    )


def _bypassed(
    graph: fx.GraphModule,
    op: Any,
    buffer: str,
    operand: Callable[[fx.Node], Any],
    expected: str,
) -> fx.GraphModule:
    """A copy of `graph` with its one call of `op` that reads `buffer` replaced by that
    call's `operand`."""
    copied = copy.deepcopy(graph)
    calls = [
        n
        for n in copied.graph.nodes
        if n.op == "call_function"
        and n.target is op
        and any(getattr(a, "op", None) == "get_attr" and a.target == buffer for a in n.args)
    ]
    if len(calls) != 1:
        raise ExportError(f"{expected}; found {len(calls)}")
    (call,) = calls
    call.replace_all_uses_with(operand(call))
    copied.graph.erase_node(call)
    eliminate_dead_code(copied)  # keeps the vmap nesting a decoder's attention mask needs
    return copied


def _max_diff(
    plain: fx.GraphModule,
    graph: fx.GraphModule,
    plain_inputs: list[tuple[Inputs, ...]],
    inputs: list[tuple[Inputs, ...]],
) -> float:
    diffs = []
    with torch.no_grad():
        for mine, theirs in zip(plain_inputs, inputs, strict=True):
            got = call_model(plain, to_device(mine[0], torch.device("cpu"))).float()
            want = call_model(graph, to_device(theirs[0], torch.device("cpu"))).float()
            diffs.append(float((got - want).abs().max()))
    return max(diffs)


def _optimum_check(
    folder: Path,
    task: str,
    graph: fx.GraphModule,
    verify_inputs: list[tuple[Inputs, ...]],
    reference: nn.Module | None = None,
    folder_inputs: list[tuple[Inputs, ...]] | None = None,
) -> tuple[float | None, str]:
    """Load the folder with optimum's ORTModel class for `task` and compare with `reference`
    (default: the PyTorch graph) on `verify_inputs` (the folder's model reads
    `folder_inputs`, when its token ids are not the teacher's)."""
    try:
        import optimum.onnxruntime as ort_models
    except ImportError as exc:
        return None, f"not checked: optimum.onnxruntime is not installed ({exc})"
    cls_name = TASKS[task][2]
    with quiet_optimum():
        model = getattr(ort_models, cls_name).from_pretrained(
            str(folder), file_name="model.onnx", local_files_only=True
        )
    diffs = []
    for inputs, own in zip(verify_inputs, folder_inputs or verify_inputs, strict=True):
        x = to_device(inputs[0], torch.device("cpu"))
        mine = to_device(own[0], torch.device("cpu"))
        assert isinstance(x, dict) and isinstance(mine, dict)
        with torch.no_grad():
            got = getattr(model(**mine), graph.meta.get(OUTPUT_NAME_META, "logits"))
            want = call_model(reference if reference is not None else graph, x).float()
        got = torch.as_tensor(np.asarray(got)).float()
        if got.shape != want.shape:
            raise ExportError(
                f"{folder}: {cls_name} output shape {tuple(got.shape)} != PyTorch {tuple(want.shape)}"
            )
        diffs.append(float((got - want).abs().max()))
    return max(diffs), f"loaded with optimum.onnxruntime.{cls_name}"


@hookimpl
def compressor_exporters() -> list[type]:
    return [HFExporter, HFInt8Exporter]
