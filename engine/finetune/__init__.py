"""Fine-tuning a diffusion pipeline to a dataset on Ray Train (`synthray finetune`): textual inversion (one
new token per class), DreamBooth-LoRA (a UNet LoRA on top of those tokens), full fine-tuning, and MVC's
image-conditioned UNet. `config` is the job's typed config, `data` the driver's image rows, `loop` the per-worker
loop every method shares, `textual_inversion`, `lora`, `full` and `mvc` what each method trains and saves. What
they write, `engine.models.diffusion` loads into every generator."""
