"""MVC's Algorithm 1 (engine/methods/mvc_mix.py): plans drawn from a seed, and the coarse (rows) and fine
(columns of one row) copies they make, on numpy arrays and torch tensors alike."""

import json

import numpy as np
import pytest
import torch

from engine.methods.mvc_mix import MixPlan, apply_mix, needed, plan_mix

M, D = 77, 768  # SD1.5's CLIP text embedding


def class_embeddings(n: int, m: int = M, d: int = D, seed: int = 0) -> list[np.ndarray]:
    # Distinct random values everywhere, so "equals the donor's" cannot hold by accident.
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((m, d)).astype(np.float32) for _ in range(n)]


def test_output_is_m_by_d_for_numpy_and_torch():
    embeddings = class_embeddings(4)
    plan = plan_mix(np.random.default_rng(0), 4, M, D, coarse_steps=1, fine_steps=2)
    assert apply_mix(embeddings, plan).shape == (M, D)
    assert tuple(apply_mix([torch.from_numpy(e) for e in embeddings], plan).shape) == (M, D)


def test_one_coarse_step_takes_rows_r_to_s_from_the_donor_and_keeps_the_rest_of_e():
    embeddings = class_embeddings(4)
    for seed in range(20):
        plan = plan_mix(np.random.default_rng(seed), 4, M, D, coarse_steps=1, fine_steps=0)
        ((donor, r, s),) = plan.coarse
        assert 0 <= r < s <= M
        out = apply_mix(embeddings, plan)
        e = embeddings[plan.base]
        assert np.array_equal(out[r:s], embeddings[donor][r:s])
        assert np.array_equal(out[:r], e[:r]) and np.array_equal(out[s:], e[s:])


def test_a_fine_step_changes_only_row_w_between_u_and_v():
    embeddings = class_embeddings(3)
    for seed in range(20):
        plan = plan_mix(np.random.default_rng(seed), 3, M, D, coarse_steps=1, fine_steps=1)
        ((donor, w, u, v),) = plan.fine
        assert 0 <= w < M and 0 <= u < v <= D
        before = apply_mix(embeddings, MixPlan(plan.base, plan.coarse))
        after = apply_mix(embeddings, plan)
        assert np.array_equal(after[w, u:v], embeddings[donor][w, u:v])
        # Everything outside row w, columns u:v, is byte-identical to before the step.
        outside = np.ones((M, D), dtype=bool)
        outside[w, u:v] = False
        assert after[outside].tobytes() == before[outside].tobytes()


def test_steps_apply_in_order_so_a_later_one_overwrites_an_earlier_one():
    a, b, c = (np.full((4, 3), value, dtype=np.float32) for value in (0, 1, 2))
    plan = MixPlan(base=0, coarse=((1, 0, 4), (2, 1, 2)), fine=((1, 1, 0, 2),))
    expected = np.array([[1, 1, 1], [1, 1, 2], [1, 1, 1], [1, 1, 1]], dtype=np.float32)
    assert np.array_equal(apply_mix([a, b, c], plan), expected)


def test_a_seed_means_one_plan_and_embedding_and_other_seeds_give_others():
    embeddings = class_embeddings(5)
    plans, mixes = [], []
    for seed in range(10):
        plan = plan_mix(np.random.default_rng(seed), 5, M, D, coarse_steps=1, fine_steps=2)
        again = plan_mix(np.random.default_rng(seed), 5, M, D, coarse_steps=1, fine_steps=2)
        assert plan == again
        assert apply_mix(embeddings, plan).tobytes() == apply_mix(embeddings, again).tobytes()
        plans.append(plan)
        mixes.append(apply_mix(embeddings, plan).tobytes())
    assert len(set(plans)) == 10 and len(set(mixes)) == 10


@pytest.mark.parametrize("num_embeddings", [2, 3, 5])
def test_a_donor_is_never_the_base_and_every_draw_is_in_range(num_embeddings):
    m, d = 3, 2  # small, so the edge cut points are drawn often
    donors, cuts = set(), set()
    for seed in range(300):
        plan = plan_mix(np.random.default_rng(seed), num_embeddings, m, d, coarse_steps=2, fine_steps=2)
        assert 0 <= plan.base < num_embeddings
        for donor, r, s in plan.coarse:
            assert donor != plan.base and 0 <= donor < num_embeddings and 0 <= r < s <= m
            donors.add(donor - plan.base)
            cuts.add((r, s))
        for donor, w, u, v in plan.fine:
            assert donor != plan.base and 0 <= donor < num_embeddings and 0 <= w < m and 0 <= u < v <= d
            donors.add(donor - plan.base)
    # Every other caption is drawn as a donor (at every offset from the base), and every row slice occurs.
    assert donors == {k for k in range(-num_embeddings + 1, num_embeddings) if k != 0}
    assert cuts == {(r, s) for s in range(m + 1) for r in range(s)}


def test_a_class_with_one_caption_gets_an_unmixed_plan_that_returns_e():
    (e,) = class_embeddings(1)
    plan = plan_mix(np.random.default_rng(0), 1, M, D, coarse_steps=1, fine_steps=2)
    assert plan == MixPlan(base=0) and not plan.mixed
    assert plan.to_dict() == {"mixed": False, "base": 0, "coarse": [], "fine": []}
    out = apply_mix([e], plan)
    assert np.array_equal(out, e) and out is not e
    assert plan_mix(np.random.default_rng(0), 2, M, D, coarse_steps=1, fine_steps=0).mixed


def test_torch_tensors_and_numpy_arrays_give_the_same_result():
    embeddings = class_embeddings(4)
    for seed in range(5):
        plan = plan_mix(np.random.default_rng(seed), 4, M, D, coarse_steps=2, fine_steps=3)
        out = apply_mix({i: torch.from_numpy(embeddings[i]) for i in needed(plan)}, plan)
        assert isinstance(out, torch.Tensor)
        assert np.array_equal(out.numpy(), apply_mix(embeddings, plan))


@pytest.mark.parametrize("to_type", [np.copy, torch.tensor], ids=["numpy", "torch"])
def test_the_inputs_are_not_modified(to_type):
    originals = class_embeddings(3)
    embeddings = [to_type(e) for e in originals]
    plan = plan_mix(np.random.default_rng(1), 3, M, D, coarse_steps=2, fine_steps=2)
    out = apply_mix(embeddings, plan)
    out[:] = 0  # the result shares no memory with any input
    for e, original in zip(embeddings, originals, strict=True):
        assert np.array_equal(np.asarray(e), original)


def test_needed_lists_base_then_donors_once_and_suffices_for_apply():
    plan = MixPlan(base=2, coarse=((0, 1, 3), (3, 0, 1)), fine=((0, 0, 0, 1), (4, 1, 1, 2)))
    assert needed(plan) == [2, 0, 3, 4]
    embeddings = class_embeddings(5, m=4, d=3)
    subset = {i: embeddings[i] for i in needed(plan)}
    assert np.array_equal(apply_mix(subset, plan), apply_mix(embeddings, plan))
    assert json.loads(json.dumps(plan.to_dict())) == {
        "mixed": True,
        "base": 2,
        "coarse": [[0, 1, 3], [3, 0, 1]],
        "fine": [[0, 0, 0, 1], [4, 1, 1, 2]],
    }
