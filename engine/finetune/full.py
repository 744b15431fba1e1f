"""Full fine-tuning (`method: full`): every weight of the pipeline's UNet, and by config its text encoder and
VAE, trained on the dataset, as diffusers' train_text_to_image example does for the UNet. What a domain far
from any pre-trained model needs (medical, remote sensing, the toy), and what a random-weight pipeline needs to
draw anything at all. Saved as a whole diffusers pipeline folder (`pipeline/`), which every generating stage
loads like any checkpoint (`model.id: <run>/pipeline`).

The VAE, when trained, goes first and alone: `vae_steps` steps of the autoencoder loss (reconstruction +
a small KL), then the denoising steps. Training it through the denoising loss instead would let the encoder
shrink its latents until predicting the noise is trivial.

torch is imported inside the functions: the driver imports this module without it.
"""

from __future__ import annotations

from pathlib import Path

PIPELINE_DIR = "pipeline"
MODULES = ("unet", "text_encoder", "text_encoder_2", "vae")


class FullFinetune:
    """The method's trainable state on one worker: whole modules of the pipeline."""

    def __init__(self, pipe, class_names: list[str], spec: dict):
        self.pipe = pipe
        self.class_names = class_names
        self.prompt = spec["prompt"]
        self.vae_steps = spec["vae_steps"]
        self.kl_weight = spec["kl_weight"]
        self.modules = ["unet"]
        if spec["train_text_encoder"]:
            self.modules += [
                m for m in ("text_encoder", "text_encoder_2") if getattr(pipe, m, None) is not None
            ]
        if self.vae_steps:
            self.modules.append("vae")
        for name in self.modules:
            getattr(pipe, name).requires_grad_(True)
            getattr(pipe, name).train()
        pipe.vae.eval()  # trained in `autoencoder_loss` only; its encoder stays deterministic elsewhere

    def parameters(self) -> list:
        # One optimizer over all of them: a module whose gradient is None in a step (the VAE after its
        # phase, the UNet during it) is not touched by AdamW that step.
        return [p for name in self.modules for p in getattr(self.pipe, name).parameters()]

    def trains_vae(self, step: int) -> bool:
        return step < self.vae_steps

    def prompt_word(self, label: int) -> str:
        return self.class_names[label]

    def instance_prompt(self, label: int) -> str:
        return self.prompt.format(class_name=self.class_names[label])

    def autoencoder_loss(self, images):
        """The VAE's loss on `images` (N x 3 x H x W in [-1, 1]): MSE reconstruction of the posterior's
        sample plus kl_weight x KL to N(0, I) (Rombach et al. 2022 add LPIPS and a GAN term; a toy or a
        first domain pass does without them)."""
        import torch

        vae = self.pipe.vae
        vae.train()
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        vae.eval()
        mse = torch.nn.functional.mse_loss(reconstruction.float(), images.float())
        return mse + self.kl_weight * posterior.kl().mean() / images[0].numel()

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_tensors(self) -> dict:
        return {
            f"{name}.{key}": value.detach().float().cpu().contiguous()
            for name in self.modules
            for key, value in getattr(self.pipe, name).state_dict().items()
        }

    def load_state_tensors(self, tensors: dict) -> None:
        for name in self.modules:
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(self.pipe, name).load_state_dict(own, strict=True)
        unknown = sorted({k.split(".")[0] for k in tensors} - set(self.modules))
        assert not unknown, f"checkpoint holds modules this run does not train: {unknown}"

    def export(self, folder: Path) -> list[Path]:
        out = Path(folder) / PIPELINE_DIR
        self.pipe.save_pretrained(out, safe_serialization=True)
        return [out]
