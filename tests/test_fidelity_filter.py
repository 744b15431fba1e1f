"""The label-fidelity filter: its rules on constructed scores, the CLIP actor on the tiny offline CLIP, and
the run: dropped rows in filtered.parquet with their rule and scores, counted in run.json."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import FilterConfig, GenerateConfig, ModelRef, load_config
from engine.config.filter import DEFAULT_NEGATIVE_PROMPTS
from engine.methods.fidelity import FIDELITY_PROB, FIDELITY_TOP, class_prompts, judge
from engine.stages.batch import object_array
from tests.conftest import ROOT, demo_overrides

CLASSES = ["circle", "cross", "diamond"]


def config(**fields) -> FilterConfig:
    return FilterConfig(model=ModelRef(id="/unused"), negative_prompts=["a photo", "an image"], **fields)


def logits(*rows):
    return np.array(rows, dtype=np.float32)


def test_rules_keep_the_matching_row_and_name_the_rule_that_drops():
    # Columns: circle, cross, diamond, "a photo", "an image".
    scores = logits(
        [9, 1, 1, 0, 0],  # circle, clearly: kept
        [1, 9, 1, 0, 0],  # looks like a cross, labelled circle: its class probability is tiny
        [3, 1, 1, 8, 0],  # "a photo" wins: the subject is gone
        [5, 4.9, 1, 0, 0],  # circle barely wins, but probability 0.5 > 1/3: kept
    )
    verdict = judge(scores, np.array([0, 0, 0, 0]), num_classes=3, config=config())
    assert list(verdict.rule) == ["", "min_prob", "negative", ""]
    assert list(verdict.top) == [0, 1, 3, 0]
    assert verdict.prob[0] > 0.99 and verdict.prob[1] < 0.01

    other = judge(scores, np.zeros(4, dtype=int), 3, config(drop_other_class=True, min_prob=0))
    assert list(other.rule) == ["", "other_class", "negative", ""]
    off = judge(scores, np.zeros(4, dtype=int), 3, config(drop_negative=False, min_prob=0))
    assert list(off.rule) == ["", "", "", ""], "every rule can be turned off"
    strict = judge(scores, np.zeros(4, dtype=int), 3, config(min_prob=0.6))
    assert list(strict.rule) == ["", "min_prob", "negative", "min_prob"]


def test_class_prompts_must_name_dataset_classes():
    assert class_prompts(config(class_prompts={"cross": "a plus sign"}), CLASSES) == [
        "a photo of a circle",
        "a plus sign",
        "a photo of a diamond",
    ]
    with pytest.raises(ValueError, match=r"does not have: \['hexagon'\]"):
        class_prompts(config(class_prompts={"hexagon": "six sides"}), CLASSES)


def test_clip_actor_drops_an_image_that_matches_another_class(tiny_models_dir):
    """The tiny CLIP's text embeddings are set to two images' own embeddings (as a trained CLIP would score
    a clear photo of that class): the image labelled with its own class is kept, the other one dropped."""
    import torch

    from actors.fidelity_filter import FidelityFilter
    from engine.models.references import clip_features

    actor = FidelityFilter(
        FilterConfig(model=ModelRef(id=str(tiny_models_dir / "clip")), device="cpu", dtype="float32"), CLASSES
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    with torch.inference_mode():
        pixels = actor.processor(images=images, return_tensors="pt").pixel_values
        embeds = torch.nn.functional.normalize(
            clip_features(actor.model.get_image_features(pixel_values=pixels)).float(), dim=-1
        )
    actor.text = actor.text.clone()
    actor.text[:3] = embeds  # class k's prompt "is" image k
    actor.scale = 100.0
    batch = {
        schema.IMAGE: object_array(images + [images[2]]),
        schema.LABEL: np.array([0, 1, 0, 2]),  # row 2 shows class 2 but is labelled 0
    }
    out = actor(batch)
    assert list(out[schema.DROP]) == ["", "", "min_prob", ""]
    assert list(out[FIDELITY_TOP]) == ["circle", "cross", "diamond", "diamond"]
    assert out[FIDELITY_PROB][0] > 1 / 3 >= out[FIDELITY_PROB][2]


@pytest.mark.slow
def test_run_writes_filtered_rows_with_rule_and_scores(ray_local, toy, tiny_models_dir, tmp_path):
    from jobs.generate import main

    out = tmp_path / "out"
    sets = demo_overrides(toy, tiny_models_dir, out) + [
        "data.splits=[train]",
        f"filter.model.id={tiny_models_dir / 'clip'}",
        "filter.device=cpu",
        "filter.max_filtered_fraction=1.0",
        "filter.stage.batch_size=8",
        # The random tiny CLIP scores "a photo" above every class: the negative rule would drop all.
        "filter.drop_negative=false",
    ]
    assert main(["--config", str(ROOT / "configs" / "aga_tiny_cpu.yaml")] + [f"--set={s}" for s in sets]) == 0
    run = json.loads((out / "run.json").read_text())
    filtered = pq.read_table(out / "filtered.parquet").to_pylist()
    rows = pq.read_table(out / "data").to_pylist()
    synthetic = [r for r in rows if r[schema.RECIPE] != schema.RECIPE_REAL]

    # The random tiny CLIP drops some rows and keeps others (min_prob 1/3 over 3 classes).
    assert 0 < len(filtered) < run["stages"]["filter"]["rows_in"]
    assert run["filtered"]["total"] == len(filtered)
    assert run["filtered"]["by_rule"] == {
        rule: sum(f["rule"] == rule for f in filtered) for rule in {f["rule"] for f in filtered}
    }
    assert len(synthetic) == run["rows"]["synthetic_written"] == run["rows"]["synthetic_expected"]
    assert len(synthetic) + len(filtered) == 12 * 2
    assert not {f[schema.ID] for f in filtered} & {r[schema.ID] for r in rows}, "a dropped row is not written"
    for dropped in filtered:
        scores = json.loads(dropped["scores"])
        assert dropped["stage"] == "filter" and dropped["rule"] == "min_prob"
        assert 0 <= scores[FIDELITY_PROB] <= 1 and scores[FIDELITY_TOP]
    for row in synthetic:  # kept rows carry their scores too
        params = json.loads(row[schema.PARAMS])
        assert params[FIDELITY_PROB] > 1 / 3 and params[FIDELITY_TOP] in CLASSES + DEFAULT_NEGATIVE_PROMPTS
    assert json.loads(synthetic[0][schema.MODELS])["filter"].endswith("@local")
    assert all(r[schema.RECIPE] == schema.RECIPE_REAL or FIDELITY_PROB in r[schema.PARAMS] for r in rows)

    # A filter that drops more than max_filtered_fraction fails the run (exit 1) naming the rules.
    strict = sets[:-2] + [
        "filter.max_filtered_fraction=0.01",
        "filter.min_prob=0.99",
        "output.overwrite=true",
    ]
    assert (
        main(["--config", str(ROOT / "configs" / "aga_tiny_cpu.yaml")] + [f"--set={s}" for s in strict]) == 1
    )


def test_filter_config_in_a_generate_config_names_unknown_classes(toy, tiny_models_dir, tmp_path):
    from engine.pipeline import prepare_run

    sets = demo_overrides(toy, tiny_models_dir, tmp_path / "out") + [
        f"filter.model.id={tiny_models_dir / 'clip'}",
        "filter.class_prompts={hexagon: six sides}",
    ]
    with pytest.raises(ValueError, match="hexagon"):
        prepare_run(load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", sets))
    assert not (tmp_path / "out").exists()
