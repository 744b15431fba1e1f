"""The loading policy on the vLLM backend (runs in .venv-vllm: `make test` runs `-m vllm` there).

A local checkpoint is checked on the driver before any engine starts (engine.models.references, the same refusal as
every other loader). A hub id or an s3:// checkpoint is fetched by each engine itself, so there the engine's
`load_format` is the only guard: the engine arguments a stage builds make vLLM's own weight loader refuse a
pickle-only checkpoint, and take it when the model says `allow_pickle`.
"""

import pytest

from engine.config import ModelRef, PromptConfig, VLLMConfig
from tests.test_loading_policy import REFUSED, pickle_only_copy

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny_llm():
    from engine.tiny.registry import build_tiny_models
    from tests.conftest import ROOT

    return build_tiny_models(ROOT / ".cache" / "tiny-models", names=["llm"])["llm"]


@pytest.fixture(scope="module")
def pickled_llm(tiny_llm, tmp_path_factory):
    return pickle_only_copy(tiny_llm, tmp_path_factory.mktemp("vllm-pickle") / "llm")


def prompt_stage(model: ModelRef):
    from engine.recipes.aga_vllm_prompts import vllm_prompt_stage

    return vllm_prompt_stage(PromptConfig(model=model, backend="vllm"), ["circle"])


def test_local_pickle_only_checkpoint_is_refused_before_the_engine(pickled_llm):
    from engine.stages.llm import build_vllm_processor

    with pytest.raises(ValueError, match=REFUSED):
        build_vllm_processor(prompt_stage(ModelRef(id=str(pickled_llm))), 0.25)
    build_vllm_processor(prompt_stage(ModelRef(id=str(pickled_llm), allow_pickle=True)), 0.25)


def weight_files(checkpoint, model: ModelRef) -> list[str]:
    """The weight files vLLM's loader picks for `checkpoint` under the engine arguments a stage builds."""
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    from engine.stages.llm import engine_kwargs

    kwargs = engine_kwargs(model, "float32", VLLMConfig(), None, False)
    loader = get_model_loader(LoadConfig(load_format=kwargs["load_format"]))
    _, files, _, _ = loader._prepare_weights(str(checkpoint), None, None, True, None)
    return files


def test_engine_arguments_make_vllm_refuse_pickled_weights(tiny_llm, pickled_llm):
    assert [f.rsplit("/", 1)[-1] for f in weight_files(tiny_llm, ModelRef(id="/m"))] == ["model.safetensors"]
    with pytest.raises(RuntimeError, match="Cannot find any model weights"):
        weight_files(pickled_llm, ModelRef(id="/m"))
    allowed = weight_files(pickled_llm, ModelRef(id="/m", allow_pickle=True))
    assert [f.rsplit("/", 1)[-1] for f in allowed] == ["pytorch_model.bin"]
