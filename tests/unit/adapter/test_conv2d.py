"""Conv2d layers adapt as their ``(out, in * kh * kw)`` matrix, for every method that works on a matrix: attach
exact at init, save / load, merge, the streamed merges (a state dict, a diffusers checkpoint folder) and the PEFT
export, on a small randomly initialised diffusers ``UNet2DModel`` (SaRA's home)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file
from torch import nn

import pissa
from helpers import WEIGHT_ONLY, relative_error
from pissa.adapter.base_layers import dense_weight

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "to_q", "to_v"]
"""Convolutions of every kernel size the UNet has (3x3, 1x1 shortcuts) and two attention projections (Linear)."""


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)


NOISY = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([3, 7])


def predict(unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(NOISY, STEPS).sample


def train(unet: nn.Module, steps: int = 3) -> None:
    """A few AdamW steps of the denoising loss (predict fixed noise), so the adapters move."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(unet(NOISY, STEPS).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad()


def adapted(method: str) -> tuple[UNet2DModel, UNet2DModel]:
    base = tiny_unet()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=2, alpha=4.0, targets=TARGETS))
    return base, model


@pytest.mark.parametrize("method", WEIGHT_ONLY)
def test_a_unet_adapts_exactly_saves_loads_and_merges(tmp_path, method) -> None:
    base, model = adapted(method)
    convs = [n for n, layer in pissa.adapted_layers(model) if isinstance(layer.residual, nn.Conv2d)]
    assert len(convs) >= 10 and any(layer.residual.kernel_size == (1, 1) for _, layer in pissa.adapted_layers(model)
                                    if isinstance(layer.residual, nn.Conv2d))
    if pissa.METHODS[method].exact_start:
        assert relative_error(predict(model), predict(base)) <= 1e-5
    train(model)
    trained = predict(model)
    assert relative_error(trained, predict(base)) > 1e-4  # the adapters moved the output
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert relative_error(predict(loaded), trained) <= 1e-6
    merged = pissa.merge(copy.deepcopy(model))
    assert not any(True for _ in pissa.adapted_layers(merged))
    assert relative_error(predict(merged), trained) <= 1e-5
    streamed = pissa.merge_state_dict(base.state_dict(), tmp_path / "a")
    for key, value in merged.state_dict().items():
        assert torch.equal(streamed[key], value), key  # bit for bit what pissa.merge gives


def test_a_diffusers_checkpoint_folder_merges_streamed(tmp_path) -> None:
    base, model = adapted("pissa")
    train(model)
    pissa.save_adapter(model, tmp_path / "a")
    base.save_pretrained(tmp_path / "unet")  # diffusion_pytorch_model.safetensors + config.json
    pissa.merge_checkpoint(tmp_path / "unet", tmp_path / "a", tmp_path / "merged", progress=False)
    on_disk = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    merged = pissa.merge(copy.deepcopy(model)).state_dict()
    assert on_disk.keys() == merged.keys() and all(torch.equal(on_disk[k], merged[k]) for k in merged)
    reloaded = UNet2DModel.from_pretrained(tmp_path / "merged")
    assert relative_error(predict(reloaded), predict(model)) <= 1e-5


def test_the_peft_export_of_conv_layers_loads_in_peft(tmp_path) -> None:
    from peft import PeftModel

    base, model = adapted("pissa")
    train(model)
    pissa.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert relative_error(predict(peft_model), predict(model)) <= 1e-5


def test_the_kernel_is_the_matrix_in_its_native_layout() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    W = dense_weight(conv)
    assert W.shape == (6, 36) and W.data_ptr() == conv.weight.data_ptr()


def test_quantized_convolutions_and_grouped_ones_are_refused_in_one_line() -> None:
    with pytest.raises(pissa.PissaError, match="is a Conv2d and quantize='nf4' makes linear residuals only; leave"):
        pissa.attach(tiny_unet(), pissa.AdapterConfig(rank=2, targets=["conv1"], quantize="nf4"))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    with pytest.raises(pissa.PissaError, match="matched no Linear/Conv1D/Conv2d layer"):
        pissa.attach(grouped, pissa.AdapterConfig(rank=2, targets=["0"]))


def test_all_linear_leaves_convolutions_alone() -> None:
    model = pissa.attach(tiny_unet(), pissa.AdapterConfig(rank=2))
    layers = [layer for _, layer in pissa.adapted_layers(model)]
    assert layers and not any(isinstance(layer.residual, nn.Conv2d) for layer in layers)
