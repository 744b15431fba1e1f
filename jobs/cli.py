"""The `synthray` command: one subcommand per job."""

from __future__ import annotations

import sys

COMMANDS = {
    "generate": "run a generation recipe (python -m jobs.generate)",
    "train": "fit a timm classifier on real + synthetic shards with Ray Train (python -m jobs.train)",
    "finetune": "textual inversion / DreamBooth-LoRA of a diffusion pipeline with Ray Train (python -m jobs.finetune)",
    "sweep": "train several strategies / ratios / seeds on the same data and print a table",
    "demo": "build tiny models and the toy dataset if missing, run the AGA demo, then compare training",
    "tiny-models": "build the offline tiny random-weight models",
    "toy-dataset": "render the procedural toy dataset",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<12} {help_}" for name, help_ in COMMANDS.items()]
        print("usage: synthray <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}; available: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from jobs.generate import main as run
    elif command == "train":
        from jobs.train import main as run
    elif command == "finetune":
        from jobs.finetune import main as run
    elif command == "sweep":
        from jobs.sweep import main as run
    elif command == "demo":
        from jobs.demo import main as run
    elif command == "tiny-models":
        from jobs.tiny_models import main as run
    else:
        from engine.tiny.toy_dataset import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
