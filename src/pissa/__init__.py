"""pissa: fine-tune the principal singular components of a model's weights; the residual stays frozen.

    cfg = pissa.AdapterConfig(method="pissa", rank=16)
    model = pissa.attach(model, cfg)          # only the factors train
    pissa.save_adapter(model, "adapter/")     # self-contained: base model + this folder
    pissa.export_peft(model, "peft_lora/")    # a rank-2r PEFT LoRA of the same model
"""

import sys

from pissa.adapter.attach import adapted_layers, attach, decompose, merge, regularization, trainable_parameters
from pissa.adapter.compressed import LowRankLinear, compress, load_compressed
from pissa.adapter.config import AdapterConfig
from pissa.adapter.export import export_peft
from pissa.adapter.gguf_export import export_gguf
from pissa.adapter.layer import PissaLinear
from pissa.adapter.named import active_adapter, list_adapters, reference, set_adapter, unload_adapter
from pissa.adapter.save_load import load_adapter, save_adapter
from pissa.calibration.collect import calibrate
from pissa.checkpoints.compress import compress_checkpoint
from pissa.checkpoints.merge import merge_checkpoint, merge_state_dict
from pissa.checkpoints.sharded import load_sharded
from pissa.errors import PissaError
from pissa.integrations import trainer as _trainer  # noqa: F401  (attached Hugging Face models save their adapter)
from pissa.methods.registry import METHODS, Decomposition
from pissa.runtime import hub

sys.modules[__name__ + ".hub"] = hub  # `import pissa.hub` names pissa.runtime.hub, the embedded models

__all__ = [
    "AdapterConfig",
    "Decomposition",
    "LowRankLinear",
    "METHODS",
    "PissaError",
    "PissaLinear",
    "active_adapter",
    "adapted_layers",
    "attach",
    "calibrate",
    "compress",
    "compress_checkpoint",
    "decompose",
    "export_peft",
    "export_gguf",
    "hub",
    "load_adapter",
    "load_compressed",
    "list_adapters",
    "load_sharded",
    "merge",
    "merge_checkpoint",
    "merge_state_dict",
    "reference",
    "regularization",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload_adapter",
]
__version__ = "0.1.0"
