"""pissa: fine-tune the principal singular components of a model's weights; the residual stays frozen.

    cfg = pissa.AdapterConfig(method="pissa", rank=16)
    model = pissa.attach(model, cfg)          # only the factors train
    pissa.save_adapter(model, "adapter/")     # self-contained: base model + this folder
    pissa.export_peft(model, "peft_lora/")    # a rank-2r PEFT LoRA of the same model
"""

from . import integrations  # noqa: F401  (attached Hugging Face models save their adapter)
from .calibration import calibrate
from .config import AdapterConfig
from .decompose import METHODS, Decomposition
from .errors import PissaError
from .io import export_peft, load_adapter, save_adapter
from .layer import PissaLinear
from .model import adapted_layers, attach, decompose, merge, regularization, trainable_parameters
from .sharded import load_sharded
from .stream import merge_checkpoint, merge_state_dict

__all__ = [
    "AdapterConfig",
    "Decomposition",
    "METHODS",
    "PissaError",
    "PissaLinear",
    "adapted_layers",
    "attach",
    "calibrate",
    "decompose",
    "export_peft",
    "load_adapter",
    "load_sharded",
    "merge",
    "merge_checkpoint",
    "merge_state_dict",
    "regularization",
    "save_adapter",
    "trainable_parameters",
]
__version__ = "0.1.0"
