"""Fine-tuning a diffusion pipeline to a dataset on Ray Train (`synthray finetune`): textual inversion (one
new token per class) and DreamBooth-LoRA (a UNet LoRA on top of those tokens). `config` is the job's typed
config, `data` the driver's image rows, `loop` the per-worker loop both methods share, `textual_inversion` and
`lora` what each method trains and saves. What they write, `engine.models.diffusion` loads into every generator."""
