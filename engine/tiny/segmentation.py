"""Tiny random-weight detect+segment models: GroundingDINO and SAM (transformers), SAM (segment-anything).

They keep the real loading paths (`from_pretrained`, `torch.load` + `load_state_dict`) runnable offline
and fast on CPU: 64-96 px inputs, 32-wide layers. Random weights mean boxes and masks are arbitrary;
detection scores are kept below saturation (about 0.6-0.8) so thresholds still select.
"""

from __future__ import annotations

import string
from pathlib import Path

# Words the tiny tokenizer knows whole. Any other lowercase ASCII word still tokenizes: single letters and
# "##" continuation letters are in the vocabulary, so nothing collapses to [UNK] and prompts stay distinct.
PROMPT_WORDS = (
    "a an the of photo object thing animal dog cat bird fish horse insect plant flower tree fruit food "
    "vehicle car truck boat airplane aircraft person shape circle square triangle star ring cross blob "
    "red green blue yellow white black"
).split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TINY_IMAGE_SIZE = 64  # SAM input side; GroundingDINO resizes the short side to this (long side <= 96)
TINY_MAX_TEXT_LEN = 64
TEXT_SCALE = 0.1  # tiny GroundingDINO's text features, scaled so scores do not saturate (see the builder)


def tokenizer_vocab() -> dict[str, int]:
    """The tiny BERT vocabulary: specials, punctuation, digits, letters, '##'-letters, prompt words."""
    tokens = list(SPECIAL_TOKENS)
    tokens += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    tokens += ["##" + c for c in string.ascii_lowercase + string.digits]
    tokens += [w for w in PROMPT_WORDS if w not in tokens]
    return {token: index for index, token in enumerate(tokens)}


def build_grounding_dino(out: Path) -> Path:
    """Write a tiny GroundingDINO (model + processor) into the directory `out`."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    out = Path(out)
    vocab = tokenizer_vocab()
    # transformers 5: BertTokenizer(vocab_file=...) maps every word to [UNK]; an in-memory vocab works.
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=TINY_MAX_TEXT_LEN)
    # A fixed pad size (the longest resized side, squared) makes each image's detector input independent of
    # the other images in its batch; random weights turn the tiny feature changes of batch-max padding into
    # different boxes. Real checkpoints pad to the batch maximum (their processor's default).
    longest = TINY_IMAGE_SIZE * 3 // 2
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE, "longest_edge": longest},
        pad_size={"height": longest, "width": longest},
    )
    backbone = SwinConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1],
        num_heads=[1, 1, 1],
        window_size=4,
        # Strides 4/8/16 (+32 for the extra level): at 64 px the coarsest map is 2x2. A 1x1 map (stride 64)
        # fails GroupNorm's "more than 1 value per channel" check for a batch of one image.
        out_features=["stage1", "stage2", "stage3"],
    )
    text = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_TEXT_LEN,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        # Two decoder layers: the tied bbox heads need a layer 0 and at least one clone to tie to it.
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=16,
        max_text_len=TINY_MAX_TEXT_LEN,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    # The box heads start at zero, so random-weight boxes are the encoder's anchor proposals (5-40% of the
    # image side). A +1 logit on width/height, applied once per decoder layer, gives object-sized boxes
    # (about 30-80%), so the tiny pipeline segments and composites something visible.
    # Scores are query-text dot products: with random 32-wide features they are about 10, so every score was
    # sigmoid(10) ~ 1.0 and no threshold below 1 ever mattered. The encoder's text output (its last
    # LayerNorm's affine) scaled by TEXT_SCALE puts the best scores near 0.6-0.8, varying with the image and
    # the prompt, so box_threshold decides which rows get a box, as with a real checkpoint.
    with torch.no_grad():
        model.bbox_embed[0].layers[-1].bias[2:] = 1.0
        text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
        text_norm.weight.mul_(TEXT_SCALE)
        text_norm.bias.mul_(TEXT_SCALE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_sam(out: Path) -> Path:
    """Write a tiny transformers SAM (SamModel + SamProcessor) into the directory `out`."""
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    out = Path(out)
    patch = 8
    embedding_side = TINY_IMAGE_SIZE // patch
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=patch,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,
            mlp_dim=64,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=32, image_size=TINY_IMAGE_SIZE, patch_size=patch, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    torch.manual_seed(0)
    model = SamModel(config).eval()
    # Low-res masks are 4x the image embedding; the processor pads images and masks to these fixed sides.
    image_processor = SamImageProcessor(
        size={"longest_edge": TINY_IMAGE_SIZE},
        pad_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        mask_size={"longest_edge": 4 * embedding_side},
        mask_pad_size={"height": 4 * embedding_side, "width": 4 * embedding_side},
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    SamProcessor(image_processor=image_processor).save_pretrained(out)
    return out


def build_sam_checkpoint(out: Path) -> Path:
    """Write a tiny segment-anything state_dict (model type `vit_tiny`) to the file `out` (safetensors)."""
    import torch
    from safetensors.torch import save_file

    from actors.segmenter import build_segment_anything

    out = Path(out)
    torch.manual_seed(0)
    sam = build_segment_anything("vit_tiny")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(out))
    return out
