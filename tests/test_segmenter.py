import numpy as np
import pytest

from actors.segmenter import DETECT_SCORE, Segmenter, build_segment_anything
from engine.config import SegmentConfig
from engine.schema import BBOX, CLASS_NAME, ERROR, ERROR_MESSAGE, ID, IMAGE, MASK, SEED

SIZES = [(64, 64), (80, 96), (96, 72), (64, 90)]  # (height, width): mixed sizes and aspect ratios
CLASSES = ["dog", "cat", "golden_retriever", "zebra"]
BACKENDS = ["transformers", "segment_anything"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads spin-wait when other processes share the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def segment_config(models, backend="transformers", **kwargs) -> SegmentConfig:
    sam = models / ("sam" if backend == "transformers" else "sam-tiny.safetensors")
    return SegmentConfig(
        backend=backend,
        detector={"id": str(models / "grounding-dino")},
        sam={"id": str(sam)},
        sam_model_type="vit_tiny",
        box_threshold=kwargs.pop("box_threshold", 0.3),
        text_threshold=0.25,
        device="cpu",
        **kwargs,
    )


def objects(arrays) -> np.ndarray:
    """An object column as Ray Data hands over variable-shaped images."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


def make_batch(classes=CLASSES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES[: len(classes)]]
    return {
        ID: np.array([f"row{i}" for i in range(len(classes))]),
        IMAGE: objects(images),
        CLASS_NAME: np.array(classes),
        SEED: np.arange(len(classes), dtype=np.int64),
        ERROR: np.array([""] * len(classes), dtype=object),
    }


def rows(batch: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {key: column[index : index + 1] for key, column in batch.items()}


@pytest.fixture(scope="module")
def segmenters(tiny_models_dir) -> dict[str, Segmenter]:
    return {backend: Segmenter(segment_config(tiny_models_dir, backend)) for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_contract(segmenters, backend):
    batch = make_batch()
    out = segmenters[backend](dict(batch))

    for key in batch:
        assert out[key] is batch[key] or np.array_equal(out[key], batch[key])
    assert list(out[ERROR]) == [""] * len(SIZES), list(out[ERROR_MESSAGE])
    assert out[DETECT_SCORE].dtype == np.float32 and (out[DETECT_SCORE] > 0.3).all()
    for (height, width), mask, box in zip(SIZES, out[MASK], out[BBOX], strict=True):
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        assert box.dtype == np.float32 and box.shape == (4,)
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_independent_of_batch(segmenters, backend):
    batch = make_batch()
    first = segmenters[backend](dict(batch))
    second = segmenters[backend](dict(batch))
    for i in range(len(SIZES)):
        assert np.array_equal(first[MASK][i], second[MASK][i])
        assert np.array_equal(first[BBOX][i], second[BBOX][i])
        # The tiny detector pads to a fixed size, so a row alone gives what it gave in the batch.
        alone = segmenters[backend](rows(batch, i))
        np.testing.assert_allclose(alone[BBOX][0], first[BBOX][i], atol=1e-3)
        assert (alone[MASK][0] == first[MASK][i]).mean() > 0.99


def test_backends_share_the_detector_but_not_the_masks(segmenters):
    batch = make_batch()
    by_backend = {backend: segmenters[backend](dict(batch)) for backend in BACKENDS}
    a, b = (by_backend[backend] for backend in BACKENDS)
    for i in range(len(SIZES)):
        np.testing.assert_allclose(a[BBOX][i], b[BBOX][i])
    assert any(not np.array_equal(a[MASK][i], b[MASK][i]) for i in range(len(SIZES)))


def test_no_detection_above_threshold(tiny_models_dir):
    segmenter = Segmenter(segment_config(tiny_models_dir, box_threshold=1.0))
    out = segmenter(make_batch())
    assert list(out[ERROR]) == ["no_detection"] * len(SIZES)
    assert all(mask is None for mask in out[MASK]) and all(box is None for box in out[BBOX])
    assert "'dog.'" in out[ERROR_MESSAGE][0] and "box_threshold=1.0" in out[ERROR_MESSAGE][0]
    assert ((out[DETECT_SCORE] > 0) & (out[DETECT_SCORE] <= 1)).all()


def test_box_threshold_selects_which_rows_get_a_box(tiny_models_dir, segmenters):
    """The tiny detector's scores do not saturate, so a threshold between them splits the batch: rows whose
    best score is above it get a box, the others are `no_detection` with that score."""
    batch = make_batch()
    scores = segmenters["transformers"](dict(batch))[DETECT_SCORE]  # box_threshold 0.3: every row
    assert scores.max() < 0.95 and np.unique(scores).size == len(scores), scores
    cut = float(np.median(scores))
    out = Segmenter(segment_config(tiny_models_dir, box_threshold=cut))(dict(batch))
    rejected = [error == "no_detection" for error in out[ERROR]]
    assert rejected == list(scores <= cut) and 0 < sum(rejected) < len(rejected), (scores, cut)
    for i, is_rejected in enumerate(rejected):
        assert (out[BBOX][i] is None) == is_rejected
        np.testing.assert_allclose(out[DETECT_SCORE][i], scores[i], rtol=1e-5)


def test_superclass_prompt(tiny_models_dir, segmenters):
    mapped = Segmenter(segment_config(tiny_models_dir, superclasses={"golden_retriever": "Dog"}))
    plain = segmenters["transformers"]
    assert mapped.prompt_for("golden_retriever") == "dog."
    assert plain.prompt_for("golden_retriever") == "golden retriever."
    assert plain.prompt_for("Red Car.") == "red car."
    # Prompt words are in the tiny vocabulary, and unknown words spell out instead of becoming [UNK].
    tokenizer = plain.detector_processor.tokenizer
    assert tokenizer.tokenize("dog.") == ["dog", "."]
    assert tokenizer.unk_token not in tokenizer.tokenize("golden retriever.")

    batch = make_batch(["golden_retriever", "dog"])
    with_map, without_map = mapped(dict(batch)), plain(dict(batch))
    # Mapped to "dog", the retriever row is detected exactly like a row of class "dog" on the same image.
    single_dog = plain({**rows(batch, 0), CLASS_NAME: np.array(["dog"])})
    np.testing.assert_allclose(with_map[DETECT_SCORE][0], single_dog[DETECT_SCORE][0], rtol=1e-6)
    np.testing.assert_allclose(with_map[BBOX][0], single_dog[BBOX][0], atol=1e-3)
    assert not np.isclose(with_map[DETECT_SCORE][0], without_map[DETECT_SCORE][0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(with_map[DETECT_SCORE][1], without_map[DETECT_SCORE][1], rtol=1e-6)


def test_missing_model_path_names_path_and_command(tmp_path, tiny_models_dir):
    missing = tmp_path / "no-such-detector"
    config = segment_config(tiny_models_dir)
    config.detector = {"id": str(missing)}
    with pytest.raises(FileNotFoundError, match="synthray tiny-models") as info:
        Segmenter(config)
    assert str(missing) in str(info.value)

    config = segment_config(tiny_models_dir, "segment_anything")
    config.sam = {"id": str(tmp_path / "no-such-sam.pth")}
    with pytest.raises(FileNotFoundError, match="no-such-sam.pth"):
        Segmenter(config)


def test_missing_columns_and_empty_batch(segmenters):
    segmenter = segmenters["transformers"]
    with pytest.raises(ValueError, match="class_name"):
        segmenter({IMAGE: make_batch()[IMAGE]})
    out = segmenter({IMAGE: objects([]), CLASS_NAME: np.array([], dtype=str)})
    assert len(out[MASK]) == len(out[BBOX]) == len(out[DETECT_SCORE]) == len(out[ERROR]) == 0


def test_unknown_sam_model_type_lists_available():
    with pytest.raises(ValueError, match="available: .*vit_tiny"):
        build_segment_anything("vit_huge")


def test_pickled_checkpoints_are_refused_unless_allowed(tiny_models_dir, tmp_path):
    """Weights load from safetensors only unless `allow_pickle: true` (then still as tensors only)."""
    import torch
    from safetensors.torch import load_file

    from actors.segmenter import Segmenter
    from engine.config import ModelRef, SegmentConfig

    pickled = tmp_path / "sam.pth"
    torch.save(load_file(str(tiny_models_dir / "sam-tiny.safetensors")), pickled)
    base = {
        "backend": "segment_anything",
        "detector": ModelRef(id=str(tiny_models_dir / "grounding-dino")),
        "sam_model_type": "vit_tiny",
        "device": "cpu",
    }
    with pytest.raises(ValueError, match="allow_pickle"):
        Segmenter(SegmentConfig(sam=ModelRef(id=str(pickled)), **base))
    Segmenter(SegmentConfig(sam=ModelRef(id=str(pickled), allow_pickle=True), **base))

    # A transformers checkpoint saved as pytorch_model.bin only is refused the same way.
    from transformers import SamModel

    bin_dir = tmp_path / "sam-bin"
    model = SamModel.from_pretrained(tiny_models_dir / "sam")
    model.save_pretrained(bin_dir)
    (bin_dir / "model.safetensors").unlink()  # transformers 5 saves safetensors only: make the .bin by hand
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (tiny_models_dir / "sam" / name).exists():
            (bin_dir / name).write_bytes((tiny_models_dir / "sam" / name).read_bytes())
    assert not list(bin_dir.glob("*.safetensors"))
    transformers_base = {**base, "backend": "transformers"}
    # The project's refusal, not the library's "no file named model.safetensors" (which also says safetensors).
    with pytest.raises(ValueError, match=r"pickled weights only .*allow_pickle: true"):
        Segmenter(SegmentConfig(sam=ModelRef(id=str(bin_dir)), **transformers_base))
    Segmenter(SegmentConfig(sam=ModelRef(id=str(bin_dir), allow_pickle=True), **transformers_base))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_boxes_give_the_union_of_their_masks_and_the_hull_of_their_boxes(tiny_models_dir, backend):
    """`boxes: all` (De-DA's CDP): every box above the threshold is segmented and the row's mask is the union
    of those masks, each computed alone here; `top` keeps the best box only."""
    import torch

    # The stage's __call__ runs in inference mode; its helpers are called directly here.
    with torch.inference_mode():
        segmenter = Segmenter(segment_config(tiny_models_dir, backend, boxes="all"))
        batch = make_batch()
        images = list(batch[IMAGE])
        _, detected = segmenter._detect(images, [segmenter.prompt_for(c) for c in batch[CLASS_NAME]])
        assert max(len(boxes) for boxes in detected) > 1, [len(b) for b in detected]
        out = segmenter(dict(batch))
        top = Segmenter(segment_config(tiny_models_dir, backend))(dict(batch))
        segment = segmenter._segment_transformers if backend == "transformers" else segmenter._segment_package
        for i, boxes in enumerate(detected):
            union = np.logical_or.reduce([segment([images[i]], [box[None]])[0] for box in boxes])
            assert ((out[MASK][i] > 0) == union).mean() > 0.99
            np.testing.assert_allclose(out[BBOX][i], [*boxes[:, :2].min(0), *boxes[:, 2:].max(0)], atol=1e-4)
            np.testing.assert_allclose(top[BBOX][i], boxes[0], atol=1e-4)
            if len(boxes) > 1:
                assert (out[MASK][i] > 0).sum() >= (top[MASK][i] > 0).sum()
