from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatstream_asgi.engines._sampling import (
    RowSampler,
    _filtered,
    _penalise,
    choose_tokens,
    pick_tokens,
    seen_tokens,
)
from chatstream_asgi.engines.base import SamplingParams, check_params
from chatstream_asgi.errors import ConfigurationError

GREEDY = SamplingParams(temperature=0.0)


def sampler(**kwargs: object) -> RowSampler:
    return RowSampler(SamplingParams(**kwargs), prompt_ids=[])  # type: ignore[arg-type]


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers, in generate's order, on one row."""
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.unsqueeze(0))
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs: torch.Tensor = scores.softmax(-1)[0]
    return probs


def our_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temperature = torch.tensor([[p.temperature] for p in params])
    return _filtered(logits / temperature, [RowSampler(p, []) for p in params]).softmax(-1)


def test_greedy_rows_take_the_argmax_of_their_row() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    assert choose_tokens(logits, [RowSampler(GREEDY, []) for _ in range(5)]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-40, 5e-324])
def test_a_temperature_too_small_for_float32_decodes_greedily(temperature: float) -> None:
    # logits / 1e-40 in float32 are inf, and softmax of inf is NaN: sampled, every row would read token 0
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(2)) * 3
    rows = [RowSampler(SamplingParams(temperature=temperature, seed=row), []) for row in range(3)]
    assert choose_tokens(logits, rows) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [0.0, 0.009, 1e-300, -1.0])
def test_a_repetition_penalty_that_would_overflow_the_logits_is_refused(penalty: float) -> None:
    with pytest.raises(ConfigurationError, match="repetition_penalty must be >= 0.01"):
        check_params(SamplingParams(repetition_penalty=penalty))
    check_params(SamplingParams(repetition_penalty=0.01))


def test_top_k_keeps_exactly_k_tokens_per_row() -> None:
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(top_k=k, top_p=1.0) for k in (1, 7, 50, 0)]
    kept = (our_probs(logits, params) > 0).sum(-1).tolist()
    assert kept == [1, 7, 50, 500]


def test_top_k_keeps_ties_at_the_kth_logit_like_transformers() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0)
    ours = our_probs(logits, [params])[0]
    assert torch.equal(ours > 0, reference_probs(logits[0], params) > 0)
    assert int((ours > 0).sum()) == 5


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(2)) * 2
    top_ps = [0.5, 0.9, 0.99]
    unfiltered = logits.softmax(-1)
    probs = our_probs(logits, [SamplingParams(temperature=1.0, top_k=0, top_p=p) for p in top_ps])
    for row, top_p in enumerate(top_ps):
        kept = unfiltered[row][probs[row] > 0]
        assert kept.min() >= unfiltered[row][probs[row] == 0].max()  # the most likely tokens
        assert kept.sum() >= top_p - 1e-6  # enough mass
        assert kept.sum() - kept.min() < top_p + 1e-6  # and no token more than needed


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_filters_match_transformers_warpers_for_mixed_rows(seed: int) -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(seed)) * 3
    params = [
        SamplingParams(temperature=0.7, top_k=10, top_p=1.0),
        SamplingParams(temperature=1.3, top_k=0, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.99),
    ]
    ours = our_probs(logits, params)
    for row, p in enumerate(params):
        expected = reference_probs(logits[row], p)
        assert torch.equal(ours[row] > 0, expected > 0)
        assert torch.allclose(ours[row], expected, atol=1e-6)


def test_repetition_penalty_matches_transformers_processor() -> None:
    logits = torch.randn(3, 60, generator=torch.Generator().manual_seed(6)) * 4
    prompts = [[3, 9, 9, 41], [0, 59], [7]]
    penalties = [1.7, 1.2, 0.8]
    group = [
        RowSampler(SamplingParams(temperature=0.0, repetition_penalty=p), ids)
        for p, ids in zip(penalties, prompts, strict=True)
    ]
    _penalise(logits, group)  # the first step covers the prompts only
    for s, token in zip(group, [17, 59, 30], strict=True):
        s.observe(token)
        s.observe(token)
    ours = _penalise(logits, group)
    for row, (prompt, token) in enumerate(zip(prompts, [17, 59, 30], strict=True)):
        ids = torch.tensor([[*prompt, token, token]])
        expected = RepetitionPenaltyLogitsProcessor(penalties[row])(ids, logits[row : row + 1])[0]
        assert torch.equal(ours[row], expected)


def test_penalty_mask_follows_each_row_when_rows_join_and_leave() -> None:
    a, b, c = (RowSampler(SamplingParams(repetition_penalty=1.3), [n]) for n in (1, 2, 3))
    seen_tokens([a, b], 10, torch.device("cpu"))
    a.observe(4)
    b.observe(5)
    first = seen_tokens([a, b], 10, torch.device("cpu"))
    assert seen_tokens([a, b], 10, torch.device("cpu")) is first  # same rows, same matrix: no copy
    c.observe(6)
    mask = seen_tokens([c, a], 10, torch.device("cpu"))  # b left, c joined in front
    assert mask.nonzero().tolist() == [[0, 3], [0, 6], [1, 1], [1, 4]]


def test_rows_with_different_parameters_each_get_their_own_treatment() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]]).repeat(6, 1)
    samplers = [
        RowSampler(GREEDY, []),  # plain argmax: token 1
        RowSampler(SamplingParams(temperature=0.0, repetition_penalty=4.0), [1]),  # 3 / 4 < 2: token 2
        sampler(temperature=5.0, top_k=1, seed=0),  # top-k 1: token 1 however hot
        sampler(temperature=1.0, top_k=0, top_p=0.01),  # the nucleus of one: token 1
        RowSampler(SamplingParams(temperature=1.0, top_k=1, repetition_penalty=4.0), [1, 2]),  # token 0
        sampler(temperature=1.0, top_k=2, top_p=1.0, seed=1),  # token 1 or 2, never 0 or 3
    ]
    tokens = choose_tokens(logits, samplers)
    assert tokens[:5] == [1, 2, 1, 1, 0]
    later = [choose_tokens(logits, samplers)[5] for _ in range(30)]  # the penalised rows move on meanwhile
    assert {tokens[5], *later} == {1, 2}


def test_greedy_rows_with_a_penalty_see_their_own_previous_tokens() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0]])
    penalised = RowSampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), [])
    assert [choose_tokens(logits, [penalised])[0] for _ in range(4)] == [0, 1, 2, 0]


def test_seeded_rows_draw_the_same_solo_and_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(4, 200, generator=gen) for _ in range(12)]
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=123)
    solo = RowSampler(params, [])
    alone = [choose_tokens(step[0:1], [solo])[0] for step in steps]
    batched = [RowSampler(params, []), sampler(seed=5), RowSampler(GREEDY, []), sampler()]
    order = [1, 3, 0, 2]  # the seeded row (logits row 0) sits at row 2 of the batch
    together = [choose_tokens(step[order], [batched[i] for i in order])[2] for step in steps]
    assert alone == together
    assert len(set(alone)) > 3  # it did sample


def test_unseeded_rows_draw_independent_noise() -> None:
    logits = torch.zeros(64, 50)
    tokens = choose_tokens(logits, [sampler(temperature=1.0, top_k=0, top_p=1.0) for _ in range(64)])
    assert len(set(tokens)) > 20


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    kept = probs > 0
    n = counts.sum()
    expected = probs[kept] * n
    return float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_tokens_follow_the_filtered_softmax(seeded: bool) -> None:
    torch.manual_seed(8)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(9)) * 2
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.0)
    draws = 20_000
    if seeded:  # each row its own generator (one seed per row)
        samplers = [RowSampler(SamplingParams(**{**params.__dict__, "seed": i}), []) for i in range(draws)]
    else:
        samplers = [RowSampler(params, []) for _ in range(draws)]
    tokens = pick_tokens(logits.expand(draws, -1), samplers)
    counts = torch.bincount(tokens, minlength=64).double()
    expected = reference_probs(logits, params).double()
    assert counts[expected == 0].sum() == 0  # no filtered token is ever drawn
    statistic, dof = chi_square(counts, expected)
    assert statistic < dof + 6 * math.sqrt(2 * dof)  # about 6 sigma: never by chance with these seeds
    frequencies = counts / draws
    assert (frequencies - expected).abs().max() < 5 * math.sqrt(0.25 / draws)


def test_one_seeded_row_over_many_steps_follows_its_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -9.0]])
    params = SamplingParams(temperature=1.0, top_k=5, top_p=1.0, seed=11)
    row = RowSampler(params, [])
    counts = torch.bincount(torch.tensor([choose_tokens(logits, [row])[0] for _ in range(4000)]), minlength=6)
    expected = reference_probs(logits[0], params).double()
    assert counts[5] == 0
    statistic, dof = chi_square(counts.double(), expected)
    assert statistic < dof + 6 * math.sqrt(2 * dof)
