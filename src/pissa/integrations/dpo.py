"""TRL's DPOTrainer on a pissa model without a reference copy: the reference is the model at its initial factors.

    model, tok = pissa.hub.load_model("smollm2")
    pissa.attach(model, pissa.AdapterConfig(rank=16))
    trainer = PissaDPOTrainer(model=model, args=DPOConfig(...), train_dataset=rows, processing_class=tok)
    trainer.train()                              # ref_model=None: no second model in memory

Why a subclass (TRL 1.16): with ``ref_model=None`` DPOTrainer either disables a PEFT adapter (for a ``PeftModel``)
or loads a second copy of the model from its config's path. Disabling is the trap for PiSSA: without its adapter a
PiSSA layer computes ``W_res x``, not the base ``W x``, so PEFT's implicit reference is wrong for PiSSA and every
method that offsets the base. pissa keeps the initial factors, so the exact reference is
:func:`pissa.reference` (``W_res + s B0 A0 = W``) on the policy's own tensors. :class:`ReferenceModel` presents that
as a model object, which DPOTrainer calls wherever it calls a reference model (the online reference forward, and
``precompute_ref_log_probs``); it holds no tensor of its own. DeepSpeed and FSDP wrap reference models themselves and
are not supported here.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from trl import DPOTrainer

from pissa.adapter.attach import adapted_layers
from pissa.adapter.named import reference
from pissa.errors import PissaError


class ReferenceModel(nn.Module):
    """The policy at its initial factors (:func:`pissa.reference`) as a model: calling it calls the policy inside
    ``pissa.reference``. The policy is not a submodule (no parameter is seen twice, nothing is copied); ``config``,
    the backbone, the output embeddings and ``state_dict`` (which TRL hashes for its precompute cache) are the
    policy's."""

    policy: nn.Module

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        if not any(True for _ in adapted_layers(policy)):
            raise PissaError("the DPO policy has no pissa adapters; call pissa.attach or pissa.load_adapter first")
        object.__setattr__(self, "policy", policy)
        self.config = getattr(policy, "config", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with reference(self.policy):
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy(*args, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        """The policy's backbone (TRL's fused LM head calls it; under :meth:`__call__` it runs at the initial factors)."""
        return cast(nn.Module, self.policy.base_model)

    def get_output_embeddings(self) -> nn.Module:
        return cast(nn.Module, cast(Any, self.policy).get_output_embeddings())

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy.state_dict(*args, **kwargs)


class PissaDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose ``ref_model=None`` is the pissa model at its initial factors (:class:`ReferenceModel`),
    exact for PiSSA, with no second copy of the model. Any other argument is DPOTrainer's."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        if ref_model is None:
            ref_model = ReferenceModel(model)
        super().__init__(model, ref_model, *args, **kwargs)  # type: ignore[arg-type]
