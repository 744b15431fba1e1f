"""The gallery: per class, a real image, its mask and its synthetic variants with their prompts.

A De-DA run's variants are its parts, labelled by part (cdp, cip, cdp_edited), followed by two composites
of the class's CDP on other classes' CIPs, made as training makes them (engine.train.recombine; training
never stores them, so this is where a user sees them). An MVC row from the image-conditioned model follows
the real image it was conditioned on (tile "condition"), and its caption is its prompt.

Writes `<gallery>/contact_sheet.png` (one row per class) and `<gallery>/index.html` (the same with
prompts), reading the shards back with pyarrow, as a user would. Both directories may be URIs.
"""

from __future__ import annotations

import functools
import html
import io
import json
from pathlib import Path

import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from engine import schema, storage
from engine.output.shards import shard_files

THUMB = 128
NUM_COMPOSITES = 2  # per class, on a De-DA run


def _kind(row: dict) -> str:
    """A tile's label: the part of a De-DA row, the model of an MVC row, else its recipe."""
    part = row.get(schema.PART)
    if part and part != schema.PART_WHOLE:
        return part
    if row[schema.RECIPE] == "mvc" and row[schema.PARAMS]:
        return f"mvc {json.loads(row[schema.PARAMS]).get('mvc', {}).get('source', '')}".strip()
    return row[schema.RECIPE]


def _condition(row: dict, real_rows: dict[str, dict]) -> tuple[str, bytes] | None:
    """(id, image) of the real row an MVC row from the image-conditioned model was conditioned on (its
    `partner`), if the shards hold it."""
    if row[schema.RECIPE] != "mvc" or not row[schema.PARAMS]:
        return None
    partner = json.loads(row[schema.PARAMS]).get("mvc", {}).get("partner")
    real = real_rows.get(partner) if partner else None
    return (real[schema.ID], real[schema.IMAGE]) if real else None


def _cip_bank(rows: list[dict]):
    """The run's CIPs as the bank training draws from (engine.methods.recombine); None when it has none."""
    import pyarrow as pa

    from engine.methods.recombine import CipBank

    cips = sorted(
        (row for row in rows if row.get(schema.PART) == schema.PART_CIP), key=lambda r: r[schema.ID]
    )
    if not cips:
        return None
    return CipBank(
        pa.table(
            {
                schema.ID: [row[schema.ID] for row in cips],
                schema.LABEL: pa.array([row[schema.LABEL] for row in cips], pa.int64()),
                schema.IMAGE: [row[schema.IMAGE] for row in cips],
            }
        )
    )


def _composites(group: list[dict], bank) -> list[bytes]:
    """PNGs of the group's CDP pasted onto CIPs of other classes in `bank`, seeded 0, 1, ... (none without)."""
    import cv2
    import numpy as np

    from engine.config import PasteConfig
    from engine.methods.recombine import compose

    cdp = next((row for row in group if row.get(schema.PART) == schema.PART_CDP), None)
    if bank is None or cdp is None or cdp[schema.MASK] is None:
        return []
    image = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(cdp[schema.IMAGE], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    mask = cv2.imdecode(np.frombuffer(cdp[schema.MASK], np.uint8), cv2.IMREAD_GRAYSCALE)
    out = []
    for seed in range(NUM_COMPOSITES):
        composite, position = compose(
            image,
            mask,
            cdp[schema.LABEL],
            bank,
            np.random.default_rng(seed),
            PasteConfig(rotation_deg=(0, 0)),
        )
        if position >= 0:
            out.append(_png(Image.fromarray(composite)))
    return out


def write_gallery(data_dir: str | Path, gallery_dir: str | Path, max_classes: int) -> str | None:
    files = shard_files(str(data_dir))
    if not files:
        return None
    columns = [
        schema.SOURCE_ID,
        schema.CLASS_NAME,
        schema.RECIPE,
        schema.IMAGE,
        schema.MASK,
        schema.PROMPT,
        schema.PARAMS,
        schema.ID,
    ]
    fs, _ = storage.filesystem(data_dir)
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    columns += [name for name in (schema.PART, schema.LABEL) if name in dataset.schema.names]
    rows = dataset.to_table(columns=columns).to_pylist()
    groups = _pick_sources(rows, max_classes)
    if not groups:
        return None

    bank = _cip_bank(rows)  # built once: every class's composites draw from it
    real_rows = {r[schema.SOURCE_ID]: r for r in rows if r[schema.RECIPE] == schema.RECIPE_REAL}
    # +1: the mask column
    width = max(len(g) + sum(_condition(r, real_rows) is not None for r in g) for g in groups) + 1
    width += NUM_COMPOSITES if bank is not None else 0
    sheet = Image.new("RGB", (width * THUMB, len(groups) * (THUMB + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    font = label_font()
    sections = []
    for r, group in enumerate(groups):
        real = next(row for row in group if row[schema.RECIPE] == schema.RECIPE_REAL)
        synthetic = [row for row in group if row is not real]
        # (label, image bytes, prompt, the row id the tile shows: a hover title to find it in the shards)
        tiles = [("real", real[schema.IMAGE], "", real[schema.ID])]
        tiles.append(("mask", real[schema.MASK], "", real[schema.ID]))
        for row in synthetic:
            condition = _condition(row, real_rows)
            if condition is not None:
                tiles.append(("condition", condition[1], "", condition[0]))
            tiles.append((_kind(row), row[schema.IMAGE], row[schema.PROMPT] or "", row[schema.ID]))
        tiles += [("composite", image, "", "") for image in _composites(synthetic, bank)]
        y = r * (THUMB + 14)
        draw.text((2, y), real[schema.CLASS_NAME], fill="black", font=font)
        cells = []
        for c, (kind, data, prompt, row_id) in enumerate(tiles):
            if data is None:
                continue
            thumb = _thumbnail(data)
            sheet.paste(thumb, (c * THUMB, y + 14))
            name = f"{r:03d}_{c:02d}.png"  # never a class name: output paths stay inside the gallery
            storage.write_bytes(storage.join(gallery_dir, "img", name), _png(thumb))
            cells.append(
                f'<figure><img src="img/{name}" width="{THUMB}" title="{html.escape(row_id)}"><figcaption><b>{kind}</b> '
                f"{html.escape(prompt)}</figcaption></figure>"
            )
        sections.append(
            f"<h2>{html.escape(real[schema.CLASS_NAME])}</h2><p>source: {html.escape(real[schema.SOURCE_ID])}</p>"
            f'<div class="row">{"".join(cells)}</div>'
        )
    storage.write_bytes(storage.join(gallery_dir, "contact_sheet.png"), _png(sheet))
    page = (
        "<!doctype html><meta charset='utf-8'><title>synthray gallery</title>"
        "<style>body{font-family:sans-serif}.row{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0;width:" + str(THUMB) + "px;font-size:11px}img{image-rendering:pixelated}</style>"
        "<h1>synthray gallery</h1><p>Per class: the real image, its subject mask, and its synthetic variants "
        "with the prompt that drew them (a De-DA run: its parts and composites as training makes them).</p>"
        + "".join(sections)
    )
    storage.write_text(storage.join(gallery_dir, "index.html"), page)
    return storage.join(gallery_dir, "index.html")


@functools.cache
def label_font(size: int = 11) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, which matplotlib ships: full Latin coverage ("Straße", "crème brûlée"), where Pillow's
    default font draws a box for every letter outside ASCII."""
    import matplotlib  # a dependency; only its data folder is used, nothing is plotted

    return ImageFont.truetype(
        str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pick_sources(rows: list[dict], max_classes: int) -> list[list[dict]]:
    """The first source (by id) of each class that has a real row and at least one synthetic row."""
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row[schema.SOURCE_ID], []).append(row)
    picked: dict[str, list[dict]] = {}
    for source in sorted(by_source):
        group = sorted(
            by_source[source], key=lambda row: (row[schema.RECIPE] != schema.RECIPE_REAL, row[schema.ID])
        )
        has_real = group[0][schema.RECIPE] == schema.RECIPE_REAL
        class_name = group[0][schema.CLASS_NAME]
        if has_real and len(group) > 1 and class_name not in picked:
            picked[class_name] = group
    return [picked[name] for name in sorted(picked)[:max_classes]]


def _thumbnail(data: bytes) -> Image.Image:
    """THUMB x THUMB, the image's aspect ratio kept (a De-DA CDP is its subject's box) on white."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = THUMB / max(img.width, img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    thumb = Image.new("RGB", (THUMB, THUMB), "white")
    thumb.paste(img, ((THUMB - size[0]) // 2, (THUMB - size[1]) // 2))
    return thumb
