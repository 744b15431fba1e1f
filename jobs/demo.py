"""`synthray demo` (`make demo`): the AGA recipe on the toy dataset with tiny offline models, K=2.

1. build the tiny models and the toy dataset when missing; 2. run generation on a local Ray cluster and
print its summary; 3. close the loop: train `real` vs `concat` on the output and print accuracy and
worst-group accuracy on the shifted test split.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"


def main(argv: list[str] | None = None) -> int:
    # Options first: `--help` answers before anything is built.
    parser = argparse.ArgumentParser(
        prog="synthray demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the demo's generation config (configs/aga_tiny_cpu.yaml); repeatable",
    )
    args = parser.parse_args(argv)
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
    # 2. Generation: the embedded default config is the demo.
    sets = [arg for override in args.overrides for arg in ("--set", override)]
    status = generate.main(["--config", str(generate.DEFAULT_CONFIG), *sets])
    if status:
        return status
    # 3. Training comparison on the demo's own shards (short: the demo's time budget).
    from jobs.sweep import compare_strategies, print_table

    rows = compare_strategies(
        [str(ROOT / "outputs" / "aga-demo" / "data")],
        str(ROOT / "outputs" / "aga-demo" / "train"),
        strategies=("real", "concat"),
        overrides=("epochs=10",),
    )
    print_table(rows, title="real vs concat (AGA, K=2) on the toy dataset's shifted test split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
