"""The Markdown page of `benchmarks.gpu_stages`: one table per section, with the device and versions."""

from __future__ import annotations

from benchmarks.record import markdown_table


def render(data: dict) -> str:
    lines = ["# GPU stage benchmark", ""]
    if data["tiny"]:
        lines += [
            f"**Tiny mode on {data['device']}: the offline tiny models, NOT GPU numbers.** It only shows that "
            "the benchmark runs; no figure here says anything about SDXL, SAM or GroundingDINO speed.",
            "",
        ]
    gpu = data["machine"]["gpu"] or "none"
    lines += [f"Device: `{data['device']}` (GPU: {gpu}; CPU: {data['machine']['cpu']}).", ""]
    lines += [f"Versions: {', '.join(f'{k} {v}' for k, v in data['versions'].items() if v)}.", ""]
    matmul = data["matmul"]
    if "error" in matmul:
        lines += [f"Matmul rate: {matmul['error']}", ""]
    else:
        lines += [
            f"Measured {matmul['dtype']} matmul rate ({matmul['n']}^3, best of 10 repeats; mean "
            f"{matmul['mean_flops_per_s'] / 1e12:.3f}): {matmul['tflops']} TFLOP/s, the denominator of MFU.",
            "",
        ]
    for section, render_section in RENDERERS.items():
        if section not in data:
            continue
        body = data[section]
        lines += [f"## {section}", ""]
        if "error" in body:
            lines += [f"error: {body['error']}", ""]
            continue
        lines += [render_section(body), ""]
    return "\n".join(lines)


def render_sdxl(body: dict) -> str:
    rows = []
    for r in body["rungs"]:
        if "error" in r:
            rows.append([r["name"], r["batch_size"], "error", r["error"][:80], "", "", "", ""])
            continue
        rows.append(
            [
                r["name"],
                r["batch_size"],
                f"{r['images_per_s']:.3g}",
                f"{r['speedup_vs_plain']:.2f}x",
                f"{r['mfu']:.3f}",
                r["peak_memory_gib"] if r["peak_memory_gib"] is not None else "n/a",
                f"{r['warmup_s']:.1f}",
                image_difference(r),
            ]
        )
    headers = [
        "configuration",
        "batch",
        "images/s",
        "vs plain",
        "MFU",
        "peak GiB",
        "warm-up s",
        "max diff / PSNR dB",
    ]
    note = (
        f"{body['image_side']} px, {body['steps']} steps, CFG {body['guidance_scale']}; {body['flops_per_image'] / 1e12:.4g} "
        "TFLOP per image (FlopCounterMode: matmuls, convolutions, attention)."
    )
    if "skipped" in body:
        note += f" Skipped: {body['skipped']}."
    return note + "\n\n" + markdown_table(headers, rows)


def image_difference(r: dict) -> str:
    if r["max_abs_diff_vs_plain"] is None:
        return "reference"
    text = (
        "identical"
        if r["psnr_vs_plain_db"] is None
        else f"{r['max_abs_diff_vs_plain']} / {r['psnr_vs_plain_db']}"
    )
    if r.get("nonfinite_rows"):
        text += f" ({r['nonfinite_rows']} rows NaN/inf)"
    return text


def render_sam(body: dict) -> str:
    rows = []
    for r in body["rungs"]:
        if "error" in r:
            rows.append([r["name"], r["batch_size"], "error", r["error"][:80], ""])
            continue
        peak = r["peak_memory_gib"] if r["peak_memory_gib"] is not None else "n/a"
        rows.append(
            [
                r["name"],
                r["batch_size"],
                f"{r['images_per_s']:.3g}",
                f"{r['fraction_of_compute_bound']:.3f}",
                peak,
            ]
        )
    note = (
        f"Image encoder at {body['image_side']} px ({body['attn_implementation']} attention); "
        f"{body['flops_per_image'] / 1e12:.4g} TFLOP per image."
    )
    return (
        note + "\n\n" + markdown_table(["dtype", "batch", "images/s", "of compute-bound", "peak GiB"], rows)
    )


def render_gdino(body: dict) -> str:
    rows = []
    for key, model in body["models"].items():
        if "error" in model:
            rows.append([key, "", "error", model["error"][:100], ""])
            continue
        for r in model["rungs"]:
            if "error" in r:
                rows.append([key, r["batch_size"], "error", r["error"][:80], ""])
                continue
            rows.append(
                [
                    key,
                    r["batch_size"],
                    f"{r['images_per_s']:.3g}",
                    f"{r['speedup_vs_loop']:.2f}x",
                    r["peak_memory_gib"] or "n/a",
                ]
            )
    height, width = body["image_hw"]
    note = f"{height}x{width} images, a {body['prompt_tokens']}-token prompt, {body['images']} images per measurement."
    if "note" in body:
        note += f" Note: {body['note']}."
    return note + "\n\n" + markdown_table(["model", "batch", "images/s", "vs loop", "peak GiB"], rows)


RENDERERS = {"sdxl": render_sdxl, "sam": render_sam, "gdino": render_gdino}
