"""Model loading for actors: resolving model references (local paths, pinned hub revisions, URIs; devices and
dtypes: `references`), the one diffusers pipeline loader with its schedulers and TI/LoRA/full adapters
(`diffusion`), the CLIP guide of the generator's gif mode (`gif_guide`), and LayerDiffuse's transparency
modules with their strict loaders (`layerdiffuse`). Only `layerdiffuse` imports torch at module level (it
defines nn.Modules): actors import and call these inside `__init__`, the driver never does."""
