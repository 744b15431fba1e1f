"""MVC's inputs for the efficacy benchmark: a caption run of the toy's training split and MVC's image-conditioned
UNet, fine-tuned (`synthray finetune`, method mvc) from the domain generator (benchmarks/domain_generator.py).

    python -m benchmarks.mvc_generator                      # after python -m benchmarks.domain_generator
    python -m benchmarks.mvc_generator --max-steps 3000     # trains on (the run resumes)

1. Captions: configs/mvc_caption_tiny_cpu.yaml with `caption.captions_file` = the toy's captions.csv ("a circle
   on sand", standing in for a captioner, as they did for the domain generator) and no prefix: the domain
   generator's text encoder learned those words, not MVC's "This is an image of ..." (a deviation, for this
   benchmark only). Written to outputs/bench/mvc-captions (the sweep's MVC variants read it).
2. The UNet: configs/finetune_mvc_tiny_cpu.yaml from the domain pipeline at 32 px, into
   outputs/bench/mvc-generator/mvc-toy/pipeline. Its 4 new input channels start at zero, so step 0 is the
   domain generator itself; the steps teach it to read the condition image.
Then `synthray sweep --config configs/bench_efficacy.yaml` runs the MVC rows (make bench-train does all three).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.config import GenerateConfig, load_config
from engine.finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / ".cache" / "toy-bench-domain"
DOMAIN_PIPELINE = ROOT / "outputs" / "bench" / "domain-generator" / "runs" / "full-toy" / "pipeline"
CAPTIONS = ROOT / "outputs" / "bench" / "mvc-captions"
GENERATOR = ROOT / "outputs" / "bench" / "mvc-generator"


def caption_run() -> dict:
    from engine.pipeline import run_generate

    config = load_config(
        GenerateConfig,
        ROOT / "configs" / "mvc_caption_tiny_cpu.yaml",
        [
            f"data.path={TOY}",
            "data.splits=[train]",
            f"output.path={CAPTIONS}",
            "output.gallery_classes=0",
            "output.overwrite=false",
            "caption.model=null",
            "caption.model_type=null",
            f"caption.captions_file={TOY / 'captions.csv'}",
            'caption.prefix=""',
        ],
    )
    return run_generate(config).data


def train_mvc(max_steps: int, overrides: list[str]) -> dict:
    from jobs.finetune import run_finetune

    config = load_config(
        FinetuneConfig,
        ROOT / "configs" / "finetune_mvc_tiny_cpu.yaml",
        [
            f"model.id={DOMAIN_PIPELINE}",
            f"data.path={CAPTIONS / 'data'}",
            "resolution=32",
            f"max_steps={max_steps}",
            "batch_size=16",
            "mvc.learning_rate=0.0001",
            'mvc.prefix=""',
            "checkpoint.every_steps=250",
            "log_every=100",
            f"output.path={GENERATOR}",
            "output.name=mvc-toy",
            *overrides,
        ],
    )
    return run_finetune(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--set", action="append", default=[], help="finetune config overrides")
    args = parser.parse_args(argv)
    if not DOMAIN_PIPELINE.is_dir():
        raise SystemExit(f"{DOMAIN_PIPELINE} is missing: run python -m benchmarks.domain_generator first")
    start = time.perf_counter()
    captions = caption_run()
    trained = train_mvc(args.max_steps, args.set)
    summary = {
        "captions": captions["rows"],
        "steps": trained.get("steps"),
        "steps_per_s": trained.get("steps_per_s"),
        "pipeline": str(Path(trained["run_dir"]) / "pipeline"),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
