"""Offline fixtures: tiny random-weight models built from configs with `save_pretrained`, one builder module
per family (`sdxl`, `sd15`, `ip2p`, `clip`, `llm`, `vlm`, `blip2`, `segmentation`), the registry that builds
and caches them (`registry`), and the procedural toy dataset (`toy_dataset`). Tests, the demo and the
benchmarks load these through the real `from_pretrained` paths."""
