"""What every benchmark result records beside its numbers (machine, versions, load) and how it is written.

Results go to `<out_dir>/<name>.json` (everything) and `<out_dir>/<name>.md` (the tables that docs/performance.md links).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"

PACKAGES = (
    "ray",
    "torch",
    "diffusers",
    "transformers",
    "opencv-python-headless",
    "pillow",
    "numpy",
    "pyarrow",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The device a result was measured on. Load average matters: these machines may be shared."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def gpu_name() -> str | None:
    """The CUDA device's name, asked only where torch is already imported: a CPU benchmark's driver never
    pays for importing torch here, nor initialises CUDA in its process."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, data: dict, markdown: str, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
