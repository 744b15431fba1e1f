"""Bad input never kills the job: each bad file is an errors-table row; good rows are untouched; the run
summarises; `max_error_fraction` turns too many errors into a non-zero exit with a clear message."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import schema

pytestmark = pytest.mark.slow


def png(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def subject(mode: str = "RGB", size=(32, 32)) -> Image.Image:
    img = Image.new("RGB", size, (20, 120, 20))
    img.paste((230, 30, 30), (8, 8, 24, 24))
    return img.convert(mode)


GOOD_MASK = png(Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)))
# exif.jpg is stored landscape (48 wide, 32 tall) with orientation 6 (rotate 90 degrees to display): upright it
# is 32 wide and 48 tall, and so is its mask. Not square, so a decoder that ignored the tag would fail it.
EXIF_STORED, EXIF_UPRIGHT = (48, 32), (32, 48)
EXIF_MASK = png(Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), ((16, 16), (8, 8)))))


def build_corpus(root):
    """Good images in odd-but-valid formats, and broken ones, in one class folder with masks."""
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = subject().convert("P")
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.asarray(subject("L"), dtype=np.uint16) * 256)
    good = {
        "rgb.png": png(subject()),
        "gray.png": png(subject("L")),
        "rgba.png": png(subject("RGBA")),
        "cmyk.jpg": png(subject("CMYK"), "JPEG"),
        "sixteen.png": png(sixteen),
        "palette.png": png(palette, transparency=0),
        "exif.jpg": png(subject(size=EXIF_STORED), "JPEG", exif=exif),
    }
    full = png(subject())
    bad = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10,
        "truncated.png": full[: len(full) // 2],
        "truncated.jpg": png(subject(), "JPEG")[:200],
        "zero.png": b"",
        "tiny.png": png(Image.new("RGB", (1, 1))),
        "huge.png": png(Image.new("RGB", (400, 400))),  # above max_pixels in the test config
        "nomask.png": png(subject()),  # its mask file is missing
    }
    folder = root / "train" / "circle"
    folder.mkdir(parents=True)
    masks = root / "masks" / "train" / "circle"
    masks.mkdir(parents=True)
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
        if name != "nomask.png":
            mask = EXIF_MASK if name == "exif.jpg" else GOOD_MASK
            (masks / (name.rsplit(".", 1)[0] + ".png")).write_bytes(mask)
    return good, bad


def run_job(root, out, tiny, max_error_fraction):
    from jobs import generate

    return generate.main(
        [
            "--set", f"data.path={root}",
            "--set", f"data.masks_path={root / 'masks'}",
            "--set", "data.splits=[train]",
            "--set", "data.max_pixels=100000",
            "--set", f"output.path={out}",
            "--set", f"max_error_fraction={max_error_fraction}",
            "--set", f"prompt.model.id={tiny / 'llm'}",
            "--set", f"background.model.id={tiny / 'sdxl'}",
            "--set", "background.height=32",
            "--set", "background.width=32",
            "--set", "background.num_inference_steps=2",
            "--set", "ray.progress_bars=false",
        ]
    )  # fmt: skip


def test_bad_files_become_error_rows(ray_local, tiny_models_dir, tmp_path, capsys):
    good, bad = build_corpus(tmp_path / "corpus")
    assert run_job(tmp_path / "corpus", tmp_path / "out", tiny_models_dir, 0.9) == 0
    errors = {
        r[schema.SOURCE_ID].rsplit("/", 1)[1]: r
        for r in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    }
    assert set(errors) == set(bad)
    reasons = {name: row["reason"] for name, row in errors.items()}
    assert reasons == {
        "corrupt.png": "decode",
        "truncated.png": "decode",
        "truncated.jpg": "decode",
        "zero.png": "decode",
        "tiny.png": "too_small",
        "huge.png": "too_large",
        "nomask.png": "missing_mask",
    }
    assert all(row["stage"] == "decode" and row["message"] for row in errors.values())

    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    real = {r[schema.SOURCE_ID].rsplit("/", 1)[1]: r for r in rows if r[schema.RECIPE] == "real"}
    assert set(real) == set(good)
    assert sum(r[schema.RECIPE] == "aga" for r in rows) == 2 * len(good)
    # Good rows untouched: upright, RGB, original size (the EXIF-rotated one decoded upright).
    for name, r in real.items():
        img = Image.open(io.BytesIO(r[schema.IMAGE]))
        assert img.mode == "RGB" and img.size == (EXIF_UPRIGHT if name == "exif.jpg" else (32, 32)), name
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["errors"]["total"] == len(bad) and run["errors"]["by_reason"]["decode"] == 4
    assert "errors 7" in capsys.readouterr().out


def test_max_error_fraction_fails_the_job(ray_local, tiny_models_dir, tmp_path, capsys):
    build_corpus(tmp_path / "corpus")
    assert run_job(tmp_path / "corpus", tmp_path / "out", tiny_models_dir, 0.1) == 1
    err = capsys.readouterr().err
    assert "above max_error_fraction=10.0%" in err and "errors.parquet" in err
    assert (tmp_path / "out" / "errors.parquet").exists()
