"""The GGUF export: a trained adapter as a llama.cpp LoRA adapter file (``llama-cli -m BASE.gguf --lora FILE``).

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes for the PEFT export of the same adapter
(:func:`pissa.adapter.export.lora_form`, the rank-2r LoRA ``s [B | -B0] [A ; A0]``):

- metadata ``general.architecture`` (llama.cpp's name of the base's architecture), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32) and ``general.quantization_version``;
- per layer two float32 tensors named after the base tensor in llama.cpp (gguf-py's ``TensorNameMap``, e.g.
  ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``) plus ``.lora_a`` and ``.lora_b``:
  ``lora_a`` is A (k, in) and ``lora_b`` is B (out, k) as torch arrays (ggml dims ``[in, k]`` and ``[k, out]``);
- for the Llama family, the rows of the q and k projections' ``lora_b`` are permuted the way the converter
  permutes those weights (llama.cpp's rotary layout): ``B.reshape(heads, 2, out / heads / 2, k)
  .swapaxes(1, 2).reshape(out, k)``, with the key/value head count for k.

llama.cpp scales each layer by ``alpha / k`` with its own rank k (the ``lora_a`` rows) and one alpha per file;
a layer whose pissa scaling s differs from ``alpha / k`` (``rank_pattern``, EVA) gets ``s k / alpha`` folded
into its ``lora_b``, so every layer's delta ``(alpha / k) lora_b @ lora_a`` is its pissa delta ``s B A``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from pissa.adapter.export import ExportReport, LoraForm, common_alpha, export_report, lora_form
from pissa.adapter.save_load import head_parameters
from pissa.errors import PissaError
from pissa.files.atomic import atomic_file


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp's converter handles one Hugging Face architecture: its ``gguf.MODEL_ARCH`` member and
    whether it permutes the q/k projection rows (the Llama family)."""

    arch: str
    permute_qk: bool


GGUF_ARCHS: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch("LLAMA", True),
    "MistralForCausalLM": GgufArch("LLAMA", True),
    "Qwen2ForCausalLM": GgufArch("QWEN2", False),
    "Qwen3ForCausalLM": GgufArch("QWEN3", False),
}
"""The architectures the GGUF export writes (as ``convert_hf_to_gguf.py`` registers them); others are refused."""


def permute_rows(B: Tensor, heads: int) -> Tensor:
    """The converter's ``LlamaModel.permute`` on the rows of ``B (out, k)``: per head, the interleaved rotary
    pairs become two halves, ``B.reshape(heads, 2, out / heads / 2, k).swapaxes(1, 2).reshape(out, k)``."""
    return B.reshape(heads, 2, B.shape[0] // heads // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def gguf_tensors(model: nn.Module, max_rank: int | None = None) -> tuple[str, float, dict[str, Tensor], LoraForm]:
    """``(architecture, alpha, tensors, form)`` of the GGUF LoRA of ``model`` (see the module docstring):
    ``tensors`` maps each llama.cpp name (``blk.N.attn_q.weight.lora_a``) to a float32 CPU tensor; ``form`` is the
    LoRA form they were written from (:func:`pissa.adapter.export.lora_form`).

    PissaError for an architecture llama.cpp's converter does not map (``model``), a layer without a GGUF tensor
    name (``targets``), or a trained head (a GGUF LoRA cannot carry one)."""
    import gguf

    name = type(model).__name__
    spec = GGUF_ARCHS.get(name)
    if spec is None:
        raise PissaError(f"`model`: the GGUF export maps {', '.join(GGUF_ARCHS)} to llama.cpp; {name} is not one "
                         "of them (export a PEFT LoRA or the merged model instead)")
    if head_parameters(model):
        raise PissaError("a GGUF LoRA cannot carry the adapter's trained head; export a PEFT LoRA or the merged model")
    form = lora_form(model, max_rank)
    r, alpha = common_alpha(form)
    config: Any = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.arch), config.num_hidden_layers)
    tensors: dict[str, Tensor] = {}
    for layer, (A, B) in form.factors.items():
        base = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if base is None:
            raise PissaError(f"`targets`: {layer} has no tensor name in llama.cpp's {spec.arch.lower()} "
                             "architecture; adapt only the attention and MLP projections for a GGUF export")
        k = A.shape[0]
        B = B * (form.scalings[layer] * k / alpha) if form.scalings[layer] * k != alpha else B
        if spec.permute_qk and layer.endswith("q_proj"):
            B = permute_rows(B, heads)
        elif spec.permute_qk and layer.endswith("k_proj"):
            B = permute_rows(B, kv_heads)
        tensors[f"{base}.lora_a"] = A.float().contiguous().cpu()
        tensors[f"{base}.lora_b"] = B.float().contiguous().cpu()
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.arch)], alpha, tensors, form


def export_gguf(model: nn.Module, path: str | os.PathLike, max_rank: int | None = None) -> ExportReport:
    """Write the llama.cpp LoRA adapter file of ``model`` (trained pissa layers) to ``path`` (atomically); rank 2r
    (or r), or truncated to ``max_rank`` like :func:`pissa.adapter.export.export_peft`, whose report it returns."""
    import gguf

    arch, alpha, tensors, form = gguf_tensors(model, max_rank)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(f"pissa LoRA of {os.path.basename(str(base).rstrip('/'))}")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dataclasses.replace(export_report(path, form, []), max_lora_rank=None)  # no vLLM rank for llama.cpp
