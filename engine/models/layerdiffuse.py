"""LayerDiffuse latent transparency (Zhang & Agrawala 2024, "Transparent Image Layer Diffusion using Latent
Transparency") for diffusers, which ships none of it.

- `LatentTransparencyOffsetEncoder`: (alpha, colour-padded RGB) at full size -> a 4-channel offset at 1/8 size.
  The transparent latent is `latent_dist.mean + latent_dist.std * offset` (`transparent_init_latents`).
- `TransparentVAEDecoder` (the reference's "UNet1024"): the VAE-decoded RGB in [0, 1] plus the *unscaled*
  latent (`latents / vae.config.scaling_factor`) -> 4 channels in the order (alpha, R, G, B).
  `decode_transparent` runs it on flips/rotations, takes the median and returns RGBA.

Published weights (SDXL): `vae_transparent_encoder.safetensors` and `vae_transparent_decoder.safetensors`
in the HF repo `LayerDiffusion/layerdiffusion-v1`; lllyasviel/LayerDiffuse_Diffusers'
`ld_diffusers_sdxl_vae_transparent_{encoder,decoder}.safetensors` load into the same classes
(lllyasviel/LayerDiffuse_DiffusersCLI lib_layerdiffuse/vae.py @ adac4a9, which scales that encoder's
offset by 300). Key names follow rootonchair/diffuser_layerdiffuse layer_diffuse/models/modules.py @
b4150c1ee8e48c2f9dbf1d1083b19a0c5aa83d9d (unchanged since 00b5ffa), the same classes as
layerdiffusion/sd-forge-layerdiffuse lib_layerdiffusion/models.py @ e4d5060e05c7b4337a3258bb03c4e3ad2f8b15bb.

The third file, the SDXL transparent attention: rootonchair's port loads its diffusers conversion as a plain
LoRA, `pipeline.load_lora_weights("rootonchair/diffuser_layerdiffuse",
weight_name="diffuser_layer_xl_transparent_attn.safetensors")` (README, test_diffusers_fg_only_sdxl.py); Forge
applies the original `layer_xl_transparent_attn.safetensors` with its own patcher (`unet.load_frozen_patcher`
in scripts/forge_layerdiffusion.py), not through diffusers. lllyasviel's `ld_diffusers_sdxl_attn.safetensors` holds additive
offsets under diffusers UNet key names, added onto the UNet's weights (DiffusersCLI demo_sdxl_i2i.py @
adac4a9): `merge_transparent_attention` does that, with a strict key check.

Pitfalls: diffusers img2img treats any 4-channel `image` as ready latents and skips the VAE (diffusers issue
6548): never pass an RGBA image; pass the offset latents (already times `scaling_factor`) as `image` on
purpose. The offset matters most at low SDEdit strength; at high strength the added noise swamps it (Forge
prints this while its encoder is unfinished).

Unlike the rest of engine/models, this module imports torch and diffusers at module level (it defines
`nn.Module`s): import it inside an actor's `__init__`, never from the driver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn

# The reference's decode augmentations, in its order: (horizontal flip, quarter turns).
AUGMENTATIONS = [(False, 0), (False, 1), (False, 2), (False, 3), (True, 0), (True, 1), (True, 2), (True, 3)]


def _zeroed(module: nn.Module) -> nn.Module:
    # The reference zero-initialises the layers that feed new signal into a pretrained path.
    for param in module.parameters():
        param.detach().zero_()
    return module


class LatentTransparencyOffsetEncoder(nn.Module):
    """(N, 4, H, W) = (alpha, padded RGB) in [0, 1] -> (N, 4, H / 2**(len(widths) - 1), ...) latent offset."""

    # Widths: the reference's fixed convs 4->32->32->64->64->128->128->256->256->4 (modules.py above).
    def __init__(self, block_out_channels: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        widths = block_out_channels
        layers = [nn.Conv2d(4, widths[0], 3, padding=1), nn.SiLU()]
        for i, width in enumerate(widths):
            if i > 0:  # each later width opens with a stride-2 conv
                layers += [nn.Conv2d(widths[i - 1], width, 3, padding=1, stride=2), nn.SiLU()]
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        layers.append(_zeroed(nn.Conv2d(block_out_channels[-1], 4, 3, padding=1)))
        self.blocks = nn.Sequential(*layers)  # SiLUs take the odd indices, as in the reference's keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class TransparentVAEDecoder(nn.Module):
    """The reference's UNet1024: pixels (N, 3, H, W) in [0, 1] + unscaled latent (N, 4, H/8, W/8) ->
    (N, 4, H, W) = (alpha, R, G, B), unclipped. Built from diffusers' UNet blocks, without time embedding."""

    LATENT_BLOCK = 3  # the latent joins before down block 3, i.e. after three 2x downsamples (1/8 size)

    # Defaults: UNet1024 in modules.py above, built there as UNet1024(in_channels=3, out_channels=4).
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 512),
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if len(block_out_channels) <= self.LATENT_BLOCK:
            raise ValueError(f"block_out_channels needs more than {self.LATENT_BLOCK} entries")
        widths, num_blocks = block_out_channels, len(block_out_channels)
        # What the reference passes to every down, mid and up block (no time embedding: temb_channels=None).
        common = dict(
            temb_channels=None,
            dropout=0.0,
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift="default",
            attention_head_dim=attention_head_dim,
        )
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.latent_conv_in = _zeroed(nn.Conv2d(4, widths[self.LATENT_BLOCK - 1], kernel_size=1))
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=widths[max(i - 1, 0)],
                    out_channels=widths[i],
                    add_downsample=i < num_blocks - 1,
                    downsample_padding=1,
                    downsample_type="conv",
                    **common,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1], output_scale_factor=1, attn_groups=None, add_attention=True, **common
        )
        reversed_widths = list(reversed(widths))
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(up_block_types):
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=reversed_widths[min(i + 1, num_blocks - 1)],
                    out_channels=reversed_widths[i],
                    prev_output_channel=reversed_widths[max(i - 1, 0)],
                    add_upsample=i < num_blocks - 1,
                    upsample_type="conv",
                    **common,
                )
            )
        self.conv_norm_out = nn.GroupNorm(num_channels=widths[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1)

    def forward(self, pixels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latent_features = self.latent_conv_in(latents)
        sample = self.conv_in(pixels)
        skips = (sample,)
        for i, block in enumerate(self.down_blocks):
            if i == self.LATENT_BLOCK:
                sample = sample + latent_features
            sample, block_skips = block(hidden_states=sample, temb=None)
            skips += block_skips
        sample = self.mid_block(sample, None)
        for block in self.up_blocks:
            num_skips = len(block.resnets)
            sample = block(sample, skips[-num_skips:], None)
            skips = skips[:-num_skips]
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


def _resize_area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # cv2 INTER_AREA when shrinking: each output pixel averages the input pixels it covers, weighted by the
    # covered fraction. torch's `area` mode rounds the windows to whole pixels, which for the 1.2x steps moved
    # the padded colour by up to 0.14; this matches cv2 to ~1e-6 (checked against the reference `pad_rgb`).
    def weights(n_in: int, n_out: int) -> torch.Tensor:
        edges = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
        pixels = torch.arange(n_in, dtype=torch.float64)
        lo, hi = torch.maximum(edges[:-1, None], pixels), torch.minimum(edges[1:, None], pixels + 1)
        overlap = (hi - lo).clamp(min=0)
        return (overlap / overlap.sum(1, keepdim=True)).to(x)

    return weights(x.shape[-2], size[0]) @ x @ weights(x.shape[-1], size[1]).T


def pad_rgb(rgba: torch.Tensor) -> torch.Tensor:
    """(N, 4, H, W) straight RGBA in [0, 1] -> (N, 3, H, W) RGB whose transparent pixels carry colour bled out
    from the opaque ones: the reference's `pad_rgb`, a premultiplied pyramid shrinking 1.2x per level (cv2's
    INTER_LINEAR upsampling is torch's bilinear with align_corners=False)."""
    color, alpha = rgba[:, :3] * rgba[:, 3:], rgba[:, 3:]
    pyramid = [(color, alpha)]
    while min(alpha.shape[-2:]) > 1:
        size = (int(alpha.shape[-2] / 1.2), int(alpha.shape[-1] / 1.2))
        color, alpha = _resize_area(color, size), _resize_area(alpha, size)
        pyramid.append((color, alpha))
    fill = color.sum((2, 3), keepdim=True) / alpha.sum((2, 3), keepdim=True).clip(1e-8, 1e32)
    for layer_color, layer_alpha in reversed(pyramid):
        fill = F.interpolate(fill, layer_color.shape[-2:], mode="bilinear", align_corners=False)
        fill = layer_color + fill * (1.0 - layer_alpha)
    return fill


@torch.no_grad()
def encode_transparency_offset(
    encoder: LatentTransparencyOffsetEncoder, rgba: torch.Tensor, offset_scale: float = 1.0
) -> torch.Tensor:
    """(N, 4, H, W) straight RGBA in [0, 1] -> (N, 4, H/8, W/8) offset. The encoder sees (alpha, padded RGB).
    offset_scale: 1.0 for layerdiffusion-v1's file (rootonchair's TransparentVAEEncoder); lllyasviel's
    DiffusersCLI uses 300 with its own ld_diffusers file."""
    feed = torch.cat([rgba[:, 3:], pad_rgb(rgba)], dim=1)
    return encoder(feed.to(next(encoder.parameters()))) * offset_scale  # the encoder's device and dtype


def transparent_init_latents(latent_dist, offset: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """The img2img init latents: the VAE posterior of the RGB composited on grey (the reference pastes onto
    (127, 127, 127)), moved by `offset` standard deviations, then scaled as the UNet expects."""
    return (latent_dist.mean + latent_dist.std * offset.to(latent_dist.mean)) * scaling_factor


@torch.no_grad()
def decode_transparent(
    decoder: TransparentVAEDecoder, pixels: torch.Tensor, latents: torch.Tensor, num_augmentations: int = 8
) -> torch.Tensor:
    """pixels (N, 3, H, W) = `(vae.decode(latents).sample / 2 + 0.5).clip(0, 1)`, latents (N, 4, H/8, W/8)
    unscaled -> (N, 4, H, W) RGBA in [0, 1]: the per-pixel median over the first `num_augmentations` of the
    reference's 8 flip/rotation passes (default 8, as the reference; fewer is faster)."""
    if not 1 <= num_augmentations <= len(AUGMENTATIONS):
        raise ValueError(f"num_augmentations must be 1..{len(AUGMENTATIONS)}, got {num_augmentations}")
    estimates = []
    for flip, turns in AUGMENTATIONS[:num_augmentations]:
        feed_pixels, feed_latents = (pixels.flip(3), latents.flip(3)) if flip else (pixels, latents)
        estimate = decoder(feed_pixels.rot90(turns, (2, 3)), feed_latents.rot90(turns, (2, 3))).clip(0, 1)
        estimate = estimate.rot90(-turns, (2, 3))
        estimates.append(estimate.flip(3) if flip else estimate)
    # torch.median takes the lower middle of an even count, as in the reference.
    alpha_rgb = torch.stack(estimates).median(dim=0).values
    return torch.cat([alpha_rgb[:, 1:], alpha_rgb[:, :1]], dim=1)


def _key_problems(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], *, all_required: bool):
    def listed(what: str, names: list[str]) -> str:
        return f"{len(names)} {what} (first: {', '.join(names[:5])})"

    missing = [k for k in expected if k not in given] if all_required else []
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs module {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and v.shape != expected[k].shape
    ]
    found = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)]
    return "; ".join(listed(what, names) for what, names in found if names)


def _as_state_dict(state_dict_or_path) -> dict[str, torch.Tensor]:
    if isinstance(state_dict_or_path, dict):
        return state_dict_or_path
    from safetensors.torch import load_file

    return load_file(state_dict_or_path)


def load_layerdiffuse_weights(module: nn.Module, state_dict_or_path) -> nn.Module:
    """Load a state dict or `.safetensors` file into `module`, strictly: any missing or unexpected key or
    shape mismatch raises a ValueError naming them, so a wrong file never half-loads."""
    state_dict = _as_state_dict(state_dict_or_path)
    problems = _key_problems(module.state_dict(), state_dict, all_required=True)
    if problems:
        raise ValueError(f"{type(module).__name__} does not match the weights: {problems}")
    module.load_state_dict(state_dict, strict=True)
    return module


@torch.no_grad()
def merge_transparent_attention(unet: nn.Module, state_dict_or_path) -> nn.Module:
    """Add lllyasviel's `ld_diffusers_sdxl_attn.safetensors` offsets onto the diffusers SDXL UNet's weights
    in place. The file need not cover every UNet weight, but every key in it must
    exist in the UNet with the same shape (the reference skips unknown keys silently; this raises)."""
    offsets = _as_state_dict(state_dict_or_path)
    weights = unet.state_dict()
    problems = _key_problems(weights, offsets, all_required=False)
    if problems:
        raise ValueError(f"transparent attention offsets do not fit the UNet: {problems}")
    for key, offset in offsets.items():
        # float32 sum: an fp16 offset added in fp16 loses its low bits on the larger base weight.
        weights[key].copy_(weights[key].float() + offset.to(weights[key].device).float())
    return unet
