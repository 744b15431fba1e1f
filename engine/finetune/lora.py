"""DreamBooth-LoRA (Ruiz et al. 2023 with Hu et al.'s LoRA, as in diffusers' dreambooth_lora examples): a peft
LoRA on the UNet's attention projections, trained with an instance prompt per class on top of textual-inversion
tokens when a TI run is given (engine.models.diffusion loads those first). Saved with the pipeline's
`save_lora_weights` (diffusers keys, safetensors), so `pipe.load_lora_weights` loads it.

torch and peft are imported inside the functions: the driver imports this module without them.
"""

from __future__ import annotations

from pathlib import Path

from engine.models.diffusion import LORA_FILE

EXTRA_TARGETS = ("add_k_proj", "add_v_proj")  # added-KV attention (e.g. the UnCLIP/IF UNets) where present


def target_modules(unet, configured: list[str]) -> list[str]:
    names = [name for name, _ in unet.named_modules()]
    extra = [m for m in EXTRA_TARGETS if m not in configured and any(n.endswith(f".{m}") for n in names)]
    return list(configured) + extra


class DreamBoothLora:
    """The method's trainable state on one worker: the LoRA matrices of the UNet."""

    def __init__(self, pipe, class_names: list[str], spec: dict, tokens: list[str] | None):
        from peft import LoraConfig

        self.pipe = pipe
        self.class_names = class_names
        self.tokens = tokens
        self.prompt = spec["prompt"]
        unet = pipe.unet
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=spec["rank"],
                lora_alpha=spec["alpha"],
                init_lora_weights="gaussian",
                target_modules=target_modules(unet, spec["target_modules"]),
            )
        )
        unet.train()
        self._parameters = [p for p in unet.parameters() if p.requires_grad]
        assert self._parameters, "the LoRA adapter added no trainable parameters"

    def parameters(self) -> list:
        return self._parameters

    def prompt_word(self, label: int) -> str:
        return self.tokens[label] if self.tokens else self.class_names[label]

    def instance_prompt(self, label: int) -> str:
        return self.prompt.format(token=self.prompt_word(label), class_name=self.class_names[label])

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_tensors(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {
            k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(self.pipe.unet).items()
        }

    def load_state_tensors(self, tensors: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.pipe.unet, tensors)
        unexpected = getattr(result, "unexpected_keys", None)
        assert not unexpected, f"checkpoint LoRA keys the UNet does not have: {unexpected[:3]}"

    def export(self, folder: Path) -> list[Path]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        out = Path(folder) / "lora"
        type(self.pipe).save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        return [out / LORA_FILE]
