"""One loading policy for every model loader: safetensors only unless the model's config says `allow_pickle`,
remote code only if it says `trust_remote_code`.

Each loader is built on a pickle-only copy of its tiny checkpoint (weights re-saved with `torch.save`, the
safetensors files removed). The refusal must be the project's own message (naming `allow_pickle`), not the
library's missing-file error, which also says "safetensors". The vLLM engine's side (`load_format`) is
checked here through `engine_kwargs` and against vLLM itself in tests/test_vllm.py.
"""

import shutil
from pathlib import Path

import pytest

from engine.config import (
    BackgroundConfig,
    CaptionConfig,
    ModelRef,
    PromptConfig,
    SegmentConfig,
    VLLMConfig,
)

# The project's refusal; transformers' and diffusers' own errors for a folder without safetensors never
# mention allow_pickle.
REFUSED = r"has pickled weights only \(.+\): synthray loads safetensors only.*set allow_pickle: true"


def pickle_only_copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder whose every `*.safetensors` is replaced by a torch.save pickle, named as
    the libraries name pickled weights (model.safetensors -> pytorch_model.bin)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    for weights in list(dst.rglob("*.safetensors")):
        stem = weights.name.removesuffix(".safetensors")
        name = "pytorch_model.bin" if stem == "model" else f"{stem}.bin"
        torch.save(load_file(str(weights)), weights.with_name(name))
        weights.unlink()
    assert not list(dst.rglob("*.safetensors")) and list(dst.rglob("*.bin"))
    return dst


def build_detector(models: Path, ref: ModelRef):
    from actors.segmenter import Segmenter

    return Segmenter(SegmentConfig(detector=ref, sam=ModelRef(id=str(models / "sam")), device="cpu"))


def build_sam(models: Path, ref: ModelRef):
    from actors.segmenter import Segmenter

    detector = ModelRef(id=str(models / "grounding-dino"))
    return Segmenter(SegmentConfig(detector=detector, sam=ref, device="cpu"))


def build_prompt_writer(models: Path, ref: ModelRef):
    from actors.prompt_writer import PromptWriter

    return PromptWriter(PromptConfig(model=ref, device="cpu"), class_names=["circle"])


def build_captioner(models: Path, ref: ModelRef):
    from actors.captioner import Captioner

    return Captioner(CaptionConfig(model=ref, device="cpu"))


def build_background(models: Path, ref: ModelRef):
    from actors.background import BackgroundGenerator

    return BackgroundGenerator(BackgroundConfig(model=ref, device="cpu", height=32, width=32))


def build_fidelity_filter(models: Path, ref: ModelRef):
    from actors.fidelity_filter import FidelityFilter
    from engine.config import FilterConfig

    return FidelityFilter(FilterConfig(model=ref, device="cpu"), class_names=["circle"])


# loader -> (tiny model folder, builder, the `from_pretrained` classes it calls, which of them load weights)
LOADERS = {
    "detector": (
        "grounding-dino",
        build_detector,
        ("AutoProcessor", "AutoModelForZeroShotObjectDetection"),
    ),
    "sam": ("sam", build_sam, ("SamProcessor", "SamModel")),
    "prompt": ("llm", build_prompt_writer, ("AutoTokenizer", "AutoModelForCausalLM")),
    "caption": ("vlm", build_captioner, ("AutoProcessor", "AutoModelForImageTextToText")),
    "background": ("sdxl", build_background, ("DiffusionPipeline",)),
    "filter": ("clip", build_fidelity_filter, ("CLIPProcessor", "CLIPModel")),
}
WEIGHT_LOADERS = {"AutoModelForZeroShotObjectDetection", "SamModel", "AutoModelForCausalLM"}
WEIGHT_LOADERS |= {"AutoModelForImageTextToText", "DiffusionPipeline", "CLIPModel"}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_pickle_only_checkpoint_is_refused_unless_allowed(loader, tiny_models_dir, tmp_path):
    folder, build, _ = LOADERS[loader]
    pickled = pickle_only_copy(tiny_models_dir / folder, tmp_path / folder)
    with pytest.raises(ValueError, match=REFUSED):
        build(tiny_models_dir, ModelRef(id=str(pickled)))
    build(tiny_models_dir, ModelRef(id=str(pickled), allow_pickle=True))  # allowed: it loads


def test_segment_anything_file_is_refused_unless_allowed(tiny_models_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from actors.segmenter import Segmenter

    pickled = tmp_path / "sam.pth"
    torch.save(load_file(str(tiny_models_dir / "sam-tiny.safetensors")), pickled)
    base = {
        "backend": "segment_anything",
        "detector": ModelRef(id=str(tiny_models_dir / "grounding-dino")),
        "sam_model_type": "vit_tiny",
        "device": "cpu",
    }
    with pytest.raises(ValueError, match=REFUSED):
        Segmenter(SegmentConfig(sam=ModelRef(id=str(pickled)), **base))
    Segmenter(SegmentConfig(sam=ModelRef(id=str(pickled), allow_pickle=True), **base))


@pytest.fixture
def recorded_loads(monkeypatch):
    """Every `from_pretrained` call of the loaders' classes, as (class name, kwargs), passed through."""
    import diffusers
    import transformers

    calls: list[tuple[str, dict]] = []
    names = {name for _, _, classes in LOADERS.values() for name in classes}
    for name in names:
        cls = getattr(diffusers if name == "DiffusionPipeline" else transformers, name)
        original = cls.from_pretrained

        def record(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return calls


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_from_pretrained_gets_the_policy_options(loader, tiny_models_dir, recorded_loads):
    """For hub ids the libraries' own options are the policy: `use_safetensors=True` on every weight load and
    `trust_remote_code` from the ModelRef on every load (tokenizers and processors too)."""
    folder, build, classes = LOADERS[loader]
    build(tiny_models_dir, ModelRef(id=str(tiny_models_dir / folder)))
    mine = [(name, kwargs) for name, kwargs in recorded_loads if name in classes]
    assert {name for name, _ in mine} == set(classes), recorded_loads
    for name, kwargs in mine:
        assert kwargs.get("trust_remote_code") is False, (name, kwargs)
        if name in WEIGHT_LOADERS:
            assert kwargs.get("use_safetensors") is True, (name, kwargs)

    recorded_loads.clear()
    ref = ModelRef(id=str(tiny_models_dir / folder), allow_pickle=True)
    build(tiny_models_dir, ref)
    weight_loads = [kw for name, kw in recorded_loads if name in classes and name in WEIGHT_LOADERS]
    assert weight_loads and all(kw.get("use_safetensors") is None for kw in weight_loads)


def test_remote_code_in_a_checkpoint_is_not_run_unless_trusted(tiny_models_dir, tmp_path):
    """A checkpoint whose config maps AutoModelForCausalLM to code shipped beside it (`auto_map`): by
    default that code never runs; with `trust_remote_code: true` it does (the canary works)."""
    import json

    ran = tmp_path / "remote-code-ran"
    checkpoint = tmp_path / "llm-with-code"
    shutil.copytree(tiny_models_dir / "llm", checkpoint)
    (checkpoint / "canary_modeling.py").write_text(
        f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CanaryConfig(LlamaConfig):\n    pass\n"
        "class CanaryForCausalLM(LlamaForCausalLM):\n    config_class = CanaryConfig\n"
    )
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "canary_modeling.CanaryConfig",
        "AutoModelForCausalLM": "canary_modeling.CanaryForCausalLM",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))

    try:
        build_prompt_writer(tiny_models_dir, ModelRef(id=str(checkpoint)))
    except ValueError as err:  # refused outright is as good as not run
        assert "trust_remote_code" in str(err)
    assert not ran.exists(), "code shipped with a checkpoint ran without trust_remote_code"

    try:
        build_prompt_writer(tiny_models_dir, ModelRef(id=str(checkpoint), trust_remote_code=True))
    except Exception:  # noqa: BLE001 - whether the canary's classes load is not the point
        pass
    assert ran.exists(), "the canary did not run even when trusted: this test would prove nothing"


def test_pickled_weights_finds_folders_without_safetensors(tmp_path):
    from engine.models.references import pickled_weights

    (tmp_path / "model_index.json").write_text('{"_class_name": "P", "unet": ["x", "y"], "vae": ["x", "y"]}')
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "original").mkdir()  # not a pipeline component: from_pretrained never reads it
    (tmp_path / "original" / "consolidated.00.pth").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "training_args.bin").write_bytes(b"")  # beside safetensors: ignored
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")  # safetensors beside it win
    assert pickled_weights(tmp_path) == [tmp_path / "unet" / "diffusion_pytorch_model.bin"]
    assert pickled_weights(tmp_path / "vae") == []
    assert pickled_weights(tmp_path / "unet" / "diffusion_pytorch_model.bin") != []
    assert pickled_weights(tmp_path / "model.safetensors") == []


def test_preflight_refuses_pickled_weights_before_ray(tiny_models_dir, tmp_path):
    """The driver's model check (before Ray starts) applies the same policy, naming the config key."""
    from engine.models.references import check_local_models

    pickled = pickle_only_copy(tiny_models_dir / "llm", tmp_path / "llm")
    config = PromptConfig(model=ModelRef(id=str(pickled)))
    with pytest.raises(ValueError, match=r"^prompt\.model model at .*" + REFUSED):
        check_local_models(config, "prompt")
    check_local_models(PromptConfig(model=ModelRef(id=str(pickled), allow_pickle=True)), "prompt")


def test_vllm_engine_loads_safetensors_only_unless_allowed():
    from engine.stages.llm import engine_kwargs

    vllm = VLLMConfig()
    strict = engine_kwargs(ModelRef(id="/m"), "float32", vllm, None, False)
    assert strict["load_format"] == "safetensors" and strict["trust_remote_code"] is False
    allowed = engine_kwargs(
        ModelRef(id="/m", allow_pickle=True, trust_remote_code=True), "float32", vllm, None, False
    )
    assert allowed["load_format"] == "auto" and allowed["trust_remote_code"] is True
    for key in ("load_format", "trust_remote_code"):
        with pytest.raises(ValueError, match=f"may not set \\['{key}'\\].*on the model"):
            engine_kwargs(ModelRef(id="/m"), "float32", VLLMConfig(engine_kwargs={key: "pt"}), None, False)
