"""Model loading for actors: resolving model references (local paths, pinned hub revisions, URIs; devices and
dtypes: `references`) and the one diffusers pipeline loader with its schedulers and TI/LoRA/full adapters
(`diffusion`). Nothing here imports torch at module level: actors call these inside `__init__`."""
