"""Model loading for actors: resolving model references (local paths, pinned hub revisions, URIs; devices and
dtypes: `references`), the one diffusers pipeline loader with its schedulers and TI/LoRA/full adapters
(`diffusion`), and the CLIP guide of the generator's gif mode (`gif_guide`). Nothing here imports torch at
module level: actors call these inside `__init__`."""
