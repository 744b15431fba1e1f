"""`synthray demo` (`make demo`): the AGA recipe on the toy dataset with tiny offline models, K=2.

1. build the tiny models and the toy dataset when missing; 2. run generation on a local Ray cluster;
3. print the summary and where the outputs are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from engine.tiny_models import build_tiny_models
    from engine.toy_dataset import make_toy_dataset
    from jobs import generate

    os.chdir(ROOT)  # the demo config names repo-relative paths (.cache/...)
    # 1. Inputs, built once.
    build_tiny_models(CACHE / "tiny-models")
    toy = CACHE / "toy-dataset"
    if not (toy / "dataset.json").exists():
        make_toy_dataset(toy)
    # 2-3. The embedded default config is the demo.
    return generate.main(["--config", str(generate.DEFAULT_CONFIG), *(argv or [])])


if __name__ == "__main__":
    sys.exit(main())
