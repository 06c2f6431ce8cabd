"""``pissa export``: a trained adapter folder to a PEFT LoRA folder, or to a merged checkpoint."""

from __future__ import annotations

from pissa.adapter.export import ExportReport, export_peft
from pissa.adapter.gguf_export import export_gguf
from pissa.adapter.save_load import load_adapter
from pissa.checkpoints.config import ExportConfig
from pissa.checkpoints.merge import merge_checkpoint
from pissa.files.adapter_dir import read_adapter_doc, recorded_base
from pissa.files.card import TRAINING
from pissa.runtime import hub


def export(cfg: ExportConfig) -> ExportReport | None:
    """Write ``cfg.out`` from the adapter ``cfg.adapter`` and its base (``cfg.model``, else the one it records).

    ``cfg.merged``: the merged Hugging Face checkpoint, streamed shard by shard
    (:func:`~pissa.checkpoints.merge.merge_checkpoint`; returns None). Otherwise the base is loaded in the
    dtype the adapter was made on, adapted, and exported as a PEFT LoRA (:func:`~pissa.adapter.export.export_peft`)
    or, with ``cfg.format == "gguf"``, a llama.cpp LoRA file (:func:`~pissa.adapter.gguf_export.export_gguf`),
    truncated to ``cfg.max_rank`` if given; returns its report (``report.path`` is what was written).
    """
    model_name, kind, num_labels, dtype = recorded_base(cfg.adapter, cfg.model, cfg.kind)
    if cfg.merged:
        merge_checkpoint(hub.resolve_model(model_name), cfg.adapter, cfg.out)
        return None
    kind = hub.resolve_kind(model_name, kind)
    model, _ = hub.load_model(model_name, kind=kind, num_labels=num_labels if kind == "seq-cls" else None, dtype=dtype)
    load_adapter(model, cfg.adapter)
    if cfg.format == "gguf":  # one file: llama.cpp reads no model card
        return export_gguf(model, cfg.out, cfg.max_rank)
    return export_peft(model, cfg.out, cfg.max_rank, training=read_adapter_doc(cfg.adapter).get(TRAINING))
