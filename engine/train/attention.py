"""Subject attention: the share of a classifier's Grad-CAM mass that falls inside the ground-truth subject mask.

The AGA paper argues that classifiers trained on its images look at the subject instead of the background.
This measures it on a split whose real rows carry masks (the toy dataset ships them): for each image, Grad-CAM
(Selvaraju et al. 2017, the `grad-cam` package) of its true class at `target_layer`, upsampled to the input,
then sum(cam * mask) / sum(cam). 1.0: all the evidence is on the subject; the subject's area share of the
image (about 0.15 on the toy dataset) is what a map spread evenly would score.

The driver calls `run_attention` after a run finished (weights from its last checkpoint, images through the
evaluation transform of engine.train.data); torch and pytorch_grad_cam are imported inside the functions.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import schema
from engine.train.config import TrainConfig

ATTENTION_FILE = "attention.json"


def subject_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image (N x H x W each): the CAM's mass inside the mask over its total; NaN where the CAM is 0."""
    cams = np.asarray(cams, np.float64)
    inside = np.asarray(masks, bool)
    if cams.shape != inside.shape:
        raise ValueError(f"CAMs {cams.shape} and masks {inside.shape} differ in shape")
    total = cams.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (cams * inside).sum(axis=(1, 2)) / total, np.nan)


def grad_cam_maps(model, target_layer: str, images: np.ndarray, labels: np.ndarray, batch_size: int = 64):
    """Grad-CAM of each image's `labels` class at `model.get_submodule(target_layer)`: N x H x W in [0, 1]."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    try:
        layer = model.get_submodule(target_layer)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(
            f"attention.target_layer {target_layer!r} is not in the model (top level: {names})"
        ) from None
    model.eval()
    maps = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            targets = [ClassifierOutputTarget(int(label)) for label in labels[start : start + batch_size]]
            maps.append(cam(input_tensor=batch, targets=targets))
    return np.concatenate(maps) if maps else np.zeros((0, *images.shape[2:]), np.float32)


def subject_attention(
    model, target_layer: str, images: np.ndarray, labels: np.ndarray, masks: np.ndarray, batch_size: int = 64
) -> dict:
    """Mean subject share over the images (N x 3 x H x W model inputs, masks N x H x W at the same size).

    `num_empty` counts images whose CAM is zero everywhere (no positive evidence for the true class); they are
    left out of the mean.
    """
    shares = subject_share(grad_cam_maps(model, target_layer, images, labels, batch_size), masks)
    valid = shares[~np.isnan(shares)]
    return {
        "subject_share": float(valid.mean()) if valid.size else None,
        "mask_area": float(np.asarray(masks, bool).mean()) if len(masks) else None,
        "num_rows": int(len(shares)),
        "num_empty": int(np.isnan(shares).sum()),
    }


def read_masked_rows(config: TrainConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The `split`'s real rows that the run evaluated on, as model inputs (the evaluation transform), labels
    and masks (0/1, resized and cropped as the images are); and how many rows had no mask (left out)."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from engine.train.data import decode_and_transform, load_training_data

    data = load_training_data(config.data, seed=config.seed)
    if split not in data.eval:
        raise ValueError(f"the shards have no {split!r} rows to measure subject attention on")
    wanted = pa.array(data.eval[split][schema.ID].to_pylist())
    columns = [schema.ID, schema.IMAGE, schema.MASK, schema.LABEL, schema.GROUP, schema.RECIPE]
    tables = []
    for file in data.files:
        table = pq.read_table(file, columns=[c for c in columns if c in pq.read_schema(file).names])
        if schema.MASK not in table.column_names:
            table = table.append_column(schema.MASK, pa.nulls(len(table), pa.binary()))
        if schema.GROUP not in table.column_names:
            table = table.append_column(schema.GROUP, pa.array(np.full(len(table), -1, np.int64)))
        tables.append(table.select(columns).filter(pc.is_in(table[schema.ID], wanted)))
    rows = pa.concat_tables(tables).sort_by(schema.ID)
    has_mask = rows[schema.MASK].is_valid().to_numpy(zero_copy_only=False)
    rows = rows.filter(pa.array(has_mask))
    size = config.data.image_size
    batch = {name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}
    inputs = decode_and_transform(
        batch, train=False, image_size=size, augment=config.augment.model_dump(), seed=config.seed, epoch=0
    )
    # The evaluation geometry (resize + center crop), nearest-neighbour so that the mask stays binary.
    geometry = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST), v2.CenterCrop(size)])
    masks = []
    for data_bytes in batch[schema.MASK]:
        with Image.open(io.BytesIO(data_bytes)) as image:
            mask = torch.from_numpy(np.array(image.convert("L")) >= 128)[None]
        masks.append(geometry(mask)[0].numpy())
    masks_array = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    return inputs["image"], inputs["label"], masks_array, int((~has_mask).sum())


def load_run_model(config: TrainConfig, metrics: dict):
    """The run's model with the weights of its last checkpoint (metrics.json's `checkpoint`)."""
    import torch

    from engine.train.loop import CHECKPOINT_FILE, build_model

    state = torch.load(Path(metrics["checkpoint"]) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model = build_model(config.model, len(metrics["data"]["class_names"]))
    model.load_state_dict(state["model"])
    return model.eval()


def run_attention(config: TrainConfig, metrics: dict, target_layer: str, split: str = "test") -> dict:
    """Subject attention of a finished run on `split`, cached in <run>/attention.json (reused while the
    checkpoint, layer and split are the same)."""
    import json

    path = Path(metrics["run_dir"]) / ATTENTION_FILE
    key = {"checkpoint": metrics["checkpoint"], "target_layer": target_layer, "split": split}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["attention"]
    images, labels, masks, unmasked = read_masked_rows(config, split)
    if not len(images):
        raise ValueError(f"no {split} row has a mask: subject attention needs masks (data.masks_path)")
    attention = subject_attention(load_run_model(config, metrics), target_layer, images, labels, masks)
    attention["rows_without_mask"] = unmasked
    path.write_text(json.dumps({"key": key, "attention": attention}, indent=2) + "\n")
    return attention
