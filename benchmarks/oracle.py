"""The efficacy benchmark's oracle row (not a model): an AGA run's rows with each synthetic row's background
drawn by the toy's own background drawers instead of a generator.

    python -m benchmarks.oracle --run outputs/bench/gen-k2-domain --out outputs/bench/oracle-k2

Every synthetic row of the AGA run (`--run`, a finished generation run over the toy) is composited again from
its real row's image and mask, with the same seed, through the compositor's own `composite_one` (the same
flip, rotation, scale and position AGA drew), onto a background of a type drawn uniformly from the toy's
in-distribution types by that seed. Real rows are copied as they are. So the oracle differs from AGA in one
thing, where the background comes from: it is the ceiling of what background diversity can do on this data,
the row a domain generator is measured against. The output is a folder like a run's (`data/`, and the run's
`config.yaml` and `manifest.json`, so training knows which dataset its rows are of); its synthetic rows have
recipe `oracle`.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from PIL import Image

from engine import schema
from engine.config import CompositeConfig
from engine.methods.paste import composite_one

RECIPE = "oracle"


def decode(data: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


def encode(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def real_rows(table: pa.Table) -> dict[str, dict]:
    """source id -> its real row (image and mask), from a table or a whole run's data."""
    real = table.filter(pa.compute.equal(table[schema.RECIPE], schema.RECIPE_REAL))
    return {
        r[schema.SOURCE_ID]: r for r in real.select([schema.SOURCE_ID, schema.IMAGE, schema.MASK]).to_pylist()
    }


def oracle_rows(
    table: pa.Table, backgrounds: list[str], config: CompositeConfig, real: dict[str, dict] | None = None
) -> pa.Table:
    """`table`'s synthetic rows re-composited; `real` holds their sources (default: `table`'s own real rows;
    a run writes its real rows to shards of their own, so `main` passes the whole run's)."""
    from engine.tiny.toy_dataset import render_background

    rows = table.to_pylist()
    real = real_rows(table) if real is None else real
    num_backgrounds = len(backgrounds)
    out = []
    for row in rows:
        if row[schema.RECIPE] == schema.RECIPE_REAL:
            out.append(row)
            continue
        source = real[row[schema.SOURCE_ID]]
        image, mask = decode(source[schema.IMAGE]), decode(source[schema.MASK], "L")
        rng = np.random.default_rng([int(row[schema.SEED]), 17])
        kind = int(rng.integers(num_backgrounds))
        size = image.shape[0]
        background = render_background(rng, backgrounds[kind], size)
        composite, new_mask, bbox, params = composite_one(
            image, mask, background, int(row[schema.SEED]), config
        )
        label = int(row[schema.LABEL])
        out.append(
            {
                **row,
                schema.IMAGE: encode(composite),
                schema.MASK: encode(new_mask),
                schema.BBOX: [float(v) for v in bbox],
                schema.RECIPE: RECIPE,
                schema.PROMPT: backgrounds[kind],
                schema.PARAMS: json.dumps({"oracle": {"background": backgrounds[kind]}, "composite": params}),
                schema.GROUP: label * num_backgrounds + kind,
            }
        )
    return pa.Table.from_pylist(out, schema=table.schema)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oracle", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A finished AGA generation run over the toy")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import yaml

    saved = yaml.safe_load((args.run / "config.yaml").read_text())
    toy = json.loads((Path(saved["data"]["path"]) / "dataset.json").read_text())
    config = CompositeConfig(**{k: v for k, v in (saved.get("composite") or {}).items() if k != "stage"})
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "data").mkdir(parents=True)
    for name in ("config.yaml", "manifest.json"):
        shutil.copy2(args.run / name, args.out / name)
    files = sorted((args.run / "data").glob("*.parquet"))
    real = real_rows(
        pq.read_table(args.run / "data", columns=[schema.SOURCE_ID, schema.RECIPE, schema.IMAGE, schema.MASK])
    )
    synthetic = 0
    for file in files:
        table = oracle_rows(pq.read_table(file), toy["backgrounds"], config, real)
        synthetic += sum(r != schema.RECIPE_REAL for r in table[schema.RECIPE].to_pylist())
        pq.write_table(table, args.out / "data" / file.name)
    print(f"oracle: {synthetic} synthetic rows on toy-drawn backgrounds from {args.run} -> {args.out}")


if __name__ == "__main__":
    main()
