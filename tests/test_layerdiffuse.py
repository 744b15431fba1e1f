"""LayerDiffuse transparency modules: published-size key tables, strict loading, tiny CPU forwards."""

import pytest
import torch
from safetensors.torch import save_file

from engine.models.layerdiffuse import (
    LatentTransparencyOffsetEncoder,
    TransparentVAEDecoder,
    decode_transparent,
    encode_transparency_offset,
    load_layerdiffuse_weights,
    merge_transparent_attention,
    pad_rgb,
    transparent_init_latents,
)

# Expected tables: derived by building the reference classes themselves on the meta device from
# rootonchair/diffuser_layerdiffuse layer_diffuse/models/modules.py @ b4150c1ee8e48c2f9dbf1d1083b19a0c5aa83d9d
# (`LatentTransparencyOffsetEncoder()` and `UNet1024(in_channels=3, out_channels=4)`, as its loaders build them
# for vae_transparent_{encoder,decoder}.safetensors) with diffusers 0.42.1, in a scratch dir outside the repo,
# and printing `{k: v.shape}` and the sum of `numel()` over the state dict.
PUBLISHED_ENCODER_KEYS = {
    "blocks.0.weight": (32, 4, 3, 3),
    "blocks.0.bias": (32,),
    "blocks.2.weight": (32, 32, 3, 3),
    "blocks.2.bias": (32,),
    "blocks.4.weight": (64, 32, 3, 3),
    "blocks.4.bias": (64,),
    "blocks.6.weight": (64, 64, 3, 3),
    "blocks.6.bias": (64,),
    "blocks.8.weight": (128, 64, 3, 3),
    "blocks.8.bias": (128,),
    "blocks.10.weight": (128, 128, 3, 3),
    "blocks.10.bias": (128,),
    "blocks.12.weight": (256, 128, 3, 3),
    "blocks.12.bias": (256,),
    "blocks.14.weight": (256, 256, 3, 3),
    "blocks.14.bias": (256,),
    "blocks.16.weight": (4, 256, 3, 3),
    "blocks.16.bias": (4,),
}
PUBLISHED_ENCODER_PARAMS = 1_181_764

# First and last keys of UNet1024, the latent injection, and attention/resnet keys from the down, mid and up paths.
PUBLISHED_DECODER_SAMPLE = {
    "conv_in.weight": (32, 3, 3, 3),
    "latent_conv_in.weight": (64, 4, 1, 1),
    "down_blocks.0.resnets.0.norm1.weight": (32,),
    "down_blocks.4.attentions.0.to_q.weight": (256, 256),
    "mid_block.attentions.0.to_out.0.weight": (512, 512),
    "up_blocks.0.attentions.0.to_k.weight": (512, 512),
    "up_blocks.1.resnets.1.conv1.weight": (512, 1024, 3, 3),
    "up_blocks.3.resnets.1.conv_shortcut.weight": (128, 256, 1, 1),
    "up_blocks.6.resnets.2.conv_shortcut.weight": (32, 64, 1, 1),
    "conv_norm_out.bias": (32,),
    "conv_out.weight": (4, 32, 3, 3),
    "conv_out.bias": (4,),
}
PUBLISHED_DECODER_NUM_KEYS = 538
PUBLISHED_DECODER_PARAMS = 104_104_804

# Seven blocks like the published decoder (so six 2x steps: H and W divisible by 64), a fraction of the width.
TINY_DECODER = dict(block_out_channels=(8, 8, 8, 8, 16, 16, 16), layers_per_block=1)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # These tensors are tiny: on a shared, loaded CPU, torch's thread pool costs more than it saves (measured
    # here: 8 tiny decoder passes took 4.3 s with 2 threads under load, 0.11 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_weights(module: torch.nn.Module, scale: float = 0.2) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v.shape) * scale for k, v in module.state_dict().items()}


def tiny_decoder() -> TransparentVAEDecoder:
    torch.manual_seed(0)
    decoder = TransparentVAEDecoder(**TINY_DECODER)
    return load_layerdiffuse_weights(decoder, random_weights(decoder)).eval()


def test_offset_encoder_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        encoder = LatentTransparencyOffsetEncoder()
    assert shapes(encoder) == PUBLISHED_ENCODER_KEYS
    assert sum(v.numel() for v in encoder.state_dict().values()) == PUBLISHED_ENCODER_PARAMS


def test_decoder_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        decoder = TransparentVAEDecoder()
    table = shapes(decoder)
    assert {k: table.get(k) for k in PUBLISHED_DECODER_SAMPLE} == PUBLISHED_DECODER_SAMPLE
    assert len(table) == PUBLISHED_DECODER_NUM_KEYS
    assert sum(v.numel() for v in decoder.state_dict().values()) == PUBLISHED_DECODER_PARAMS


def test_load_accepts_a_matching_dict_and_safetensors_file(tmp_path):
    decoder = TransparentVAEDecoder(**TINY_DECODER)
    weights = random_weights(decoder)
    load_layerdiffuse_weights(decoder, weights)
    assert torch.equal(decoder.conv_out.weight, weights["conv_out.weight"])

    encoder = LatentTransparencyOffsetEncoder()
    weights = random_weights(encoder)
    save_file(weights, tmp_path / "vae_transparent_encoder.safetensors")
    load_layerdiffuse_weights(encoder, tmp_path / "vae_transparent_encoder.safetensors")
    assert torch.equal(encoder.blocks[16].weight, weights["blocks.16.weight"])


def test_load_refuses_missing_unexpected_and_misshapen_keys_without_loading_any():
    encoder = LatentTransparencyOffsetEncoder()
    before = encoder.blocks[0].weight.clone()
    weights = random_weights(encoder)
    del weights["blocks.16.bias"]
    weights["blocks.18.weight"] = torch.zeros(4, 4, 3, 3)
    weights["blocks.2.weight"] = torch.zeros(32, 16, 3, 3)
    with pytest.raises(ValueError) as error:
        load_layerdiffuse_weights(encoder, weights)
    message = str(error.value)
    assert "1 missing keys" in message and "blocks.16.bias" in message
    assert "1 unexpected keys" in message and "blocks.18.weight" in message
    assert "blocks.2.weight: file (32, 16, 3, 3) vs module (32, 32, 3, 3)" in message
    assert torch.equal(encoder.blocks[0].weight, before)


def test_offset_encoder_maps_rgba_to_an_eighth_size_offset():
    torch.manual_seed(0)
    encoder = LatentTransparencyOffsetEncoder(block_out_channels=(4, 8, 8, 8))
    load_layerdiffuse_weights(encoder, random_weights(encoder))
    rgba = torch.rand(2, 4, 32, 48)
    assert encoder(rgba).shape == (2, 4, 4, 6)
    offset = encode_transparency_offset(encoder, rgba)
    assert offset.shape == (2, 4, 4, 6)
    assert torch.allclose(encode_transparency_offset(encoder, rgba, offset_scale=300.0), offset * 300.0)


def test_pad_rgb_keeps_opaque_colour_and_fills_transparent_pixels_from_it():
    rgba = torch.zeros(1, 4, 40, 56)
    rgba[:, 3:, 10:20, 30:40] = 1.0  # the only opaque pixels: one orange patch; transparent RGB is noise
    rgba[:, :3] = torch.rand(1, 3, 40, 56)
    rgba[:, :3, 10:20, 30:40] = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    padded = pad_rgb(rgba)
    assert padded.shape == (1, 3, 40, 56)
    expected = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1).expand_as(padded)
    assert torch.allclose(padded, expected, atol=1e-5)


def test_transparent_init_latents_moves_the_mean_by_offset_stds():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.cat(
        [torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), 2 * torch.log(torch.tensor(3.0)))], 1
    )
    latents = transparent_init_latents(
        DiagonalGaussianDistribution(moments), torch.full((1, 4, 2, 2), 0.5), 0.13025
    )
    assert torch.allclose(latents, torch.full((1, 4, 2, 2), (1.0 + 3.0 * 0.5) * 0.13025))


def test_tiny_decoder_maps_pixels_and_latent_to_rgba_in_range():
    decoder = tiny_decoder()
    pixels, latents = torch.rand(2, 3, 64, 128), torch.randn(2, 4, 8, 16)
    with torch.no_grad():
        raw = decoder(pixels, latents)
    assert raw.shape == (2, 4, 64, 128)
    assert raw.min() < 0 or raw.max() > 1  # random weights: the raw output is unclipped, the helper clips
    rgba = decode_transparent(decoder, pixels, latents, num_augmentations=1)
    assert rgba.shape == (2, 4, 64, 128)
    assert rgba.min() >= 0 and rgba.max() <= 1
    # One pass, no augmentation: the raw (alpha, R, G, B) clipped and reordered to RGBA.
    assert torch.equal(rgba, torch.cat([raw[:, 1:], raw[:, :1]], 1).clip(0, 1))


def test_median_decode_returns_rgba_of_the_input_size():
    decoder = tiny_decoder()
    rgba = decode_transparent(decoder, torch.rand(1, 3, 64, 128), torch.randn(1, 4, 8, 16))
    assert rgba.shape == (1, 4, 64, 128)
    assert rgba.min() >= 0 and rgba.max() <= 1


class PerPixelDecoder(torch.nn.Module):
    """Answers (alpha = mean of RGB, RGB) pixel by pixel, so every flip/rotation must be undone exactly."""

    def forward(self, pixels, latents):
        assert latents.shape[-2:] == (pixels.shape[-2] // 8, pixels.shape[-1] // 8)  # turned together
        return torch.cat([pixels.mean(1, keepdim=True), pixels], 1)


def test_median_decode_undoes_each_flip_and_rotation():
    pixels = torch.rand(1, 3, 16, 24)
    rgba = decode_transparent(PerPixelDecoder(), pixels, torch.randn(1, 4, 2, 3))
    assert torch.allclose(rgba, torch.cat([pixels, pixels.mean(1, keepdim=True)], 1))


@pytest.mark.parametrize("num_augmentations", [0, 9])
def test_decode_refuses_an_impossible_number_of_augmentations(num_augmentations):
    with pytest.raises(ValueError, match="num_augmentations"):
        decode_transparent(
            PerPixelDecoder(), torch.rand(1, 3, 16, 16), torch.rand(1, 4, 2, 2), num_augmentations
        )


def tiny_unet() -> torch.nn.Module:
    # Stands in for the SDXL UNet: merge_transparent_attention only touches its state dict.
    unet = torch.nn.Module()
    unet.to_q = torch.nn.Linear(4, 4)
    unet.to_k = torch.nn.Linear(4, 4)
    return unet


def test_merge_transparent_attention_adds_offsets_to_the_named_weights():
    unet = tiny_unet()
    q_before, k_before = unet.to_q.weight.clone(), unet.to_k.weight.clone()
    offset = torch.randn(4, 4)
    merge_transparent_attention(unet, {"to_q.weight": offset})
    assert torch.allclose(unet.to_q.weight, q_before + offset)
    assert torch.equal(unet.to_k.weight, k_before)


def test_merge_transparent_attention_refuses_unknown_and_misshapen_keys_without_merging():
    unet = tiny_unet()
    before = unet.to_q.weight.clone()
    offsets = {"to_q.weight": torch.ones(4, 4), "to_v.weight": torch.ones(4, 4), "to_k.bias": torch.ones(5)}
    with pytest.raises(ValueError) as error:
        merge_transparent_attention(unet, offsets)
    assert "to_v.weight" in str(error.value) and "to_k.bias: file (5,) vs module (4,)" in str(error.value)
    assert torch.equal(unet.to_q.weight, before)
