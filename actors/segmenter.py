"""Detect + segment: GroundingDINO finds the class's box, SAM turns the box into a mask.

Reads `image` (HxWx3 uint8) and `class_name`. Writes:
- `mask`: HxW uint8 (0/255) at the image's size, or None when the row failed;
- `bbox`: float32 [x0, y0, x1, y1] in image pixels (the most confident box; with `boxes: all` the box around
  every kept box), or None;
- `detect_score`: float32 score of that box; on a `no_detection` row, the best score seen (below threshold);
- `error` / `error_message`: "no_detection" when no box scores above `box_threshold`, "empty_mask" when SAM's
  best mask for the box has no foreground pixel.

With `boxes: all` every box above `box_threshold` gets its SAM mask and the row's mask is their union.

As in GroundingDINO's own `predict`, `box_threshold` decides which boxes count and `text_threshold` only picks
the phrase tokens of a box's label, so it never drops a row.

Nothing here is random, so rows need no seed. A detector processor without `pad_size` pads each batch to its
largest image, so a row's box can shift slightly with its batch-mates (a lot with random weights); the tiny
processor sets a fixed `pad_size`, which makes every row independent of its batch. SAM always pads to a fixed
size.
"""

from __future__ import annotations

import numpy as np

from engine import schema
from engine.config import SegmentConfig
from engine.models.references import pretrained_kwargs, resolve_device, resolve_model, torch_dtype

DETECT_SCORE = "detect_score"
TINY_SAM_TYPE = "vit_tiny"


def build_segment_anything(model_type: str):
    """An untrained segment-anything `Sam`: the registry's vit_h/vit_l/vit_b, or the offline `vit_tiny`."""
    from segment_anything import sam_model_registry

    if model_type != TINY_SAM_TYPE:
        if model_type not in sam_model_registry:
            raise ValueError(
                f"unknown sam_model_type {model_type!r}; available: {sorted(sam_model_registry) + [TINY_SAM_TYPE]}"
            )
        # No checkpoint here: the registry would unpickle it; the caller loads weights_only.
        return sam_model_registry[model_type]()
    return _build_tiny_segment_anything()


def _build_tiny_segment_anything():
    """vit_tiny: the registry's architecture at 64 px with 32-wide layers, for offline tests and demos."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_size, patch, dim = 64, 8, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


class Segmenter:
    """Ray Data callable: one detector forward and one SAM forward per batch (or SamPredictor per image)."""

    stage_name = "segment"

    def __init__(self, config: SegmentConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = torch_dtype(config.dtype, self.device)
        self._load_detector()
        if config.backend == "transformers":
            self._load_sam_transformers()
        else:
            self._load_sam_package()

    # ------------------------------------------------------------------ loading

    def _load_detector(self) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        path, revision = resolve_model(self.config.detector, "detector (GroundingDINO)")
        ref = self.config.detector
        self.detector_processor = AutoProcessor.from_pretrained(
            path, **pretrained_kwargs(ref, revision, False)
        )
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(
            path, **pretrained_kwargs(ref, revision)
        )
        self.detector.to(self.device, self.dtype).eval()

    def _load_sam_transformers(self) -> None:
        from transformers import SamModel, SamProcessor

        path, revision = resolve_model(self.config.sam, "SAM (transformers)")
        ref = self.config.sam
        self.sam_processor = SamProcessor.from_pretrained(path, **pretrained_kwargs(ref, revision, False))
        self.sam = (
            SamModel.from_pretrained(path, **pretrained_kwargs(ref, revision))
            .to(self.device, self.dtype)
            .eval()
        )

    def _load_sam_package(self) -> None:
        import torch
        from segment_anything import SamPredictor

        path, _ = resolve_model(self.config.sam, "SAM (segment-anything checkpoint)")
        sam = build_segment_anything(self.config.sam_model_type)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        elif self.config.sam.allow_pickle:
            # weights_only: even an allowed pickle is loaded as tensors only, never as code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(
                f"{path} is a pickled checkpoint; convert it to .safetensors or set segment.sam.allow_pickle: true"
            )
        sam.load_state_dict(state)
        # segment-anything builds its prompt tensors in float32, so weights stay float32 and half precision
        # comes from autocast (on CUDA only).
        self.sam = sam.to(self.device).eval()
        self.predictor = SamPredictor(self.sam)

    # ------------------------------------------------------------------ transform

    def prompt_for(self, class_name: str) -> str:
        """Detection text: the class's superclass (default the class name), lowercased, ending with '.'."""
        text = self.config.superclasses.get(class_name, class_name.replace("_", " "))
        text = " ".join(text.lower().split()).rstrip(".")
        return text + "."

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # Grad mode is per thread and Ray may call from any thread: set it here, not in __init__.
        with torch.inference_mode():
            return self._segment_batch(batch)

    def _segment_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, [schema.IMAGE, schema.CLASS_NAME], self.stage_name)
        images = list(batch[schema.IMAGE])
        num_rows = len(images)
        masks = np.full(num_rows, None, dtype=object)
        boxes = np.full(num_rows, None, dtype=object)
        errors = _string_column(batch, schema.ERROR, num_rows)
        messages = _string_column(batch, schema.ERROR_MESSAGE, num_rows)

        prompts = [self.prompt_for(str(name)) for name in batch[schema.CLASS_NAME]]
        scores, detected = self._detect(images, prompts) if num_rows else (np.zeros(0, np.float32), [])
        for i, box in enumerate(detected):
            if box is None:
                errors[i] = "no_detection"
                messages[i] = (
                    f"no box for {prompts[i]!r} above box_threshold={self.config.box_threshold} "
                    f"(best score {scores[i]:.3f})"
                )
            else:
                # One row's boxes (k x 4); its bbox is their hull.
                boxes[i] = np.concatenate([box[:, :2].min(axis=0), box[:, 2:].max(axis=0)]).astype(np.float32)

        live = [i for i in range(num_rows) if boxes[i] is not None]
        segment = (
            self._segment_transformers if self.config.backend == "transformers" else self._segment_package
        )
        live_masks = segment([images[i] for i in live], [detected[i] for i in live]) if live else []
        for i, mask in zip(live, live_masks, strict=True):
            if mask.any():
                masks[i] = mask.astype(np.uint8) * 255
            else:
                errors[i] = "empty_mask"
                messages[i] = f"SAM's best masks for boxes {detected[i].tolist()} have no foreground pixel"

        return {
            **batch,
            schema.MASK: masks,
            schema.BBOX: boxes,
            DETECT_SCORE: scores,
            schema.ERROR: errors,
            schema.ERROR_MESSAGE: messages,
        }

    def _detect(self, images: list[np.ndarray], prompts: list[str]) -> tuple[np.ndarray, list]:
        """Per image its boxes (k x 4 float32 xyxy clipped to the image: the best one, or with `boxes: all`
        every box above the threshold, best first; None when none) and the best score."""
        import torch

        max_text_len = self.detector.config.max_text_len
        inputs = self.detector_processor(
            images=images,
            text=prompts,
            padding=True,
            truncation=True,
            max_length=max_text_len,
            input_data_format="channels_last",
            return_tensors="pt",
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.detector(**inputs)
        sizes = [image.shape[:2] for image in images]
        results = self.detector_processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold,
            target_sizes=sizes,
        )
        # Scores of every query, for the diagnostic on rows with no box above the threshold.
        best_scores = torch.sigmoid(outputs.logits.float()).amax(dim=(1, 2)).cpu().numpy()
        scores = np.zeros(len(images), dtype=np.float32)
        boxes: list = []
        for i, (result, (height, width)) in enumerate(zip(results, sizes, strict=True)):
            if len(result["scores"]) == 0:
                scores[i] = best_scores[i]
                boxes.append(None)
                continue
            order = result["scores"].argsort(descending=True)
            if self.config.boxes != "all":
                order = order[:1]
            scores[i] = float(result["scores"][order[0]])
            found = result["boxes"][order].float().cpu().numpy().reshape(-1, 4)
            boxes.append(np.clip(found, 0, [width, height, width, height]).astype(np.float32))
        return scores, boxes

    def _segment_transformers(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """One SamModel forward for all images and their boxes; per box the best of the 3 masks by predicted
        IoU, per image the union over its boxes."""
        # The processor needs as many boxes per image: shorter lists repeat their first box, whose mask the
        # union already holds.
        most = max(len(b) for b in boxes)
        padded = [[*b.tolist(), *[b[0].tolist()] * (most - len(b))] for b in boxes]
        inputs = self.sam_processor(
            images=images,
            input_boxes=padded,
            input_data_format="channels_last",
            return_tensors="pt",
        ).to(self.device)
        outputs = self.sam(
            pixel_values=inputs["pixel_values"].to(self.dtype),
            input_boxes=inputs["input_boxes"].to(self.dtype),
            multimask_output=True,
        )
        full_size = self.sam_processor.image_processor.post_process_masks(
            outputs.pred_masks.float().cpu(),
            inputs["original_sizes"].cpu(),
            inputs["reshaped_input_sizes"].cpu(),
        )
        best = outputs.iou_scores.float().argmax(dim=-1).cpu()  # (images, boxes)
        return [
            np.logical_or.reduce([full_size[i][j, int(best[i, j])].numpy() for j in range(most)])
            for i in range(len(images))
        ]

    def _segment_package(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """segment-anything's SamPredictor, one image at a time; per box the best of 3 masks by predicted IoU,
        per image the union over its boxes."""
        import torch

        half = self.device.startswith("cuda") and self.dtype != torch.float32
        masks = []
        for image, image_boxes in zip(images, boxes, strict=True):
            union = np.zeros(image.shape[:2], bool)
            with torch.autocast("cuda", dtype=self.dtype, enabled=half):
                self.predictor.set_image(np.ascontiguousarray(image), image_format="RGB")
                for box in image_boxes:
                    candidates, iou_scores, _ = self.predictor.predict(box=box, multimask_output=True)
                    union |= candidates[int(np.argmax(iou_scores))].astype(bool)
            masks.append(union)
        self.predictor.reset_image()
        return masks


def _string_column(batch: dict[str, np.ndarray], name: str, num_rows: int) -> np.ndarray:
    """A writable object copy of an existing string column, or a new one of empty strings."""
    if name in batch:
        return np.array(batch[name], dtype=object)
    return np.full(num_rows, "", dtype=object)
