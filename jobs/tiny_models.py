"""`synthray tiny-models --out DIR`: build the offline tiny random-weight models (no download)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from engine.tiny.registry import DEFAULT_DIR, TINY_MODELS, build_tiny_models

    parser = argparse.ArgumentParser(prog="synthray tiny-models", description=__doc__)
    parser.add_argument("--out", default=str(DEFAULT_DIR), help=f"output directory (default {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    built = build_tiny_models(Path(args.out), force=args.force)
    for name in TINY_MODELS:
        print(f"  {name:<16} {built[name]}")
    print(f"tiny models ready in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
