import math

import pytest
import torch

from nanochat.sampling import (
    penalize_logits,
    process_logits,
    sample_next_token,
    token_logprobs,
    validate_sampling_params,
)


def logits_of(probs):
    return torch.tensor([probs]).log()


def test_temperature_one_is_softmax():
    logits = torch.randn(3, 50)
    assert torch.allclose(process_logits(logits, 1.0), torch.softmax(logits, -1), atol=1e-6)


def test_temperature_zero_is_argmax_one_hot():
    logits = torch.randn(4, 30)
    probs = process_logits(logits, 0.0, top_k=5, top_p=0.3)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(4)) and (probs.max(-1).values == 1).all()


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 1e-7])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    """logits / 1e-40 overflows float32 (the softmax turns to NaN and sampling raises): such rows are greedy."""
    logits = torch.randn(3, 30) * 10
    for probs in (process_logits(logits, temperature), process_logits(logits, [temperature, 0.5, 1.0], [0, 5, 0], [1.0, 0.9, 0.5])):
        assert torch.isfinite(probs).all() and torch.equal(probs[0].argmax(), logits[0].argmax()) and probs[0].max() == 1
    assert torch.equal(sample_next_token(logits, None, temperature), logits.argmax(-1, keepdim=True))


def test_temperature_scales_logits():
    logits = torch.randn(2, 20)
    assert torch.allclose(process_logits(logits, 0.5), torch.softmax(logits / 0.5, -1), atol=1e-6)


@pytest.mark.parametrize("top_p,kept", [(0.45, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}),
                                        (0.94, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_exactly_the_nucleus(top_p, kept):
    """Smallest set of most likely tokens whose mass reaches p (0.5, 0.8, 0.95, 1.0 cumulative)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = process_logits(probs.log()[None], 1.0, top_p=top_p)[0]
    assert {i for i in range(4) if out[i] > 0} == kept
    expected = torch.zeros(4)
    idx = sorted(kept)
    expected[idx] = probs[idx] / probs[idx].sum()
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("top_p", [1e-9, 5e-324])  # 5e-324 (the smallest double) is 0 in float32
def test_top_p_always_keeps_one_token(top_p):
    out = process_logits(torch.tensor([[2.0, 1.0, 0.0]]), 1.0, top_p=top_p)[0]
    assert out.tolist() == [1.0, 0.0, 0.0]


def test_top_k_then_top_p_within_k():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = process_logits(probs.log()[None], 1.0, top_k=2)[0]
    assert torch.allclose(out, torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=1e-6)
    # inside the top-2, token 0 has 4/7 = 0.571 of the mass: p = 0.5 keeps it alone, p = 0.6 keeps both
    assert process_logits(probs.log()[None], 1.0, top_k=2, top_p=0.5)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (process_logits(probs.log()[None], 1.0, top_k=2, top_p=0.6)[0] > 0).tolist() == [True, True, False, False]


def test_per_row_parameters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    probs = process_logits(logits, temperature=[0.0, 1.0, 1.0], top_k=[None, 2, 0], top_p=torch.tensor([1.0, 1.0, 0.5]))
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (probs[1] > 0).tolist() == [True, True, False, False]
    assert (probs[2] > 0).tolist() == [True, False, False, False]  # softmax(3,2,1,0)[0] = 0.64 >= 0.5


def test_seeded_generator_reproduces_and_does_not_touch_global_rng():
    logits = torch.randn(8, 100)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_next_token(logits, torch.Generator().manual_seed(7))
    b = sample_next_token(logits, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), before)  # the global RNG did not move
    c = [sample_next_token(logits, torch.Generator().manual_seed(s)) for s in range(5)]
    assert any(not torch.equal(a, x) for x in c)


def test_empirical_distribution_matches():
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    expected = process_logits(logits, 0.8, top_k=3)[0]
    g = torch.Generator().manual_seed(0)
    samples = sample_next_token(logits.expand(20000, 4), g, 0.8, top_k=3)[:, 0]
    empirical = torch.bincount(samples, minlength=4).float() / 20000
    assert (empirical - expected).abs().sum() / 2 < 0.02  # total variation within sampling noise


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature must be >= 0"),
    (dict(temperature=3.0, max_temperature=2.0), "temperature must be <= 2.0"),
    (dict(top_k=-1), "top_k must be a non-negative integer"),
    (dict(top_k=2.5), "top_k must be a non-negative integer"),
    (dict(top_k=500, max_top_k=200), "top_k must be <= 200"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature="hot"), "temperature must be a number"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_sampling_params(**kwargs)


def test_top_k_fast_path_equals_sorted_path():
    """Top-k alone uses a partial topk; with a (trivial) top-p the full sort runs. Both must agree."""
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    top_k = [3, 0, 17, 300, 1]  # mixed rows, including "no top-k"
    fast = process_logits(logits, 0.7, top_k=top_k)
    sorted_path = process_logits(logits, 0.7, top_k=top_k, top_p=[1.0] * 5)
    assert torch.allclose(fast, sorted_path, atol=1e-6)
    assert ((fast > 0).sum(-1)).tolist() == [3, 300, 17, 300, 1]


def test_greedy_sampling_is_argmax_without_randomness():
    logits = torch.randn(6, 50)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(sample_next_token(logits, g, 0.0)[:, 0], logits.argmax(-1))
    assert torch.equal(g.get_state(), state)  # greedy draws nothing from the generator


def test_penalties_and_logit_bias_follow_openai_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    generated = [3, 3, 1, 3]  # token 3 three times, token 1 once
    out = penalize_logits(logits, generated, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={0: 10.0, 2: -1})
    # logit[j] - c[j] * 0.5 - (c[j] > 0) * 0.25 + bias[j]
    assert torch.equal(out, torch.tensor([1.0 + 10, 2.0 - 0.5 - 0.25, 3.0 - 1, 4.0 - 1.5 - 0.25]))
    assert torch.equal(logits, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # the input is left alone
    assert torch.equal(penalize_logits(logits, [], frequency_penalty=2.0, presence_penalty=2.0), logits)
    negative = penalize_logits(logits, [0], frequency_penalty=-1.0)  # negative penalties encourage repeats
    assert negative[0] == 2.0


def test_min_tokens_holds_the_end_back_whatever_its_bias():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    held = penalize_logits(logits, [1, 2], logit_bias={3: 100.0}, min_tokens=3, eos_ids={3, 0})
    assert held[0] == held[3] == float("-inf") and held[1] == 2.0
    assert torch.equal(penalize_logits(logits, [1, 2, 2], min_tokens=3, eos_ids={3, 0}), logits)


def test_token_logprobs_are_the_tempered_distribution_before_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    out = token_logprobs(logits, [1, 1], temperature=[0.5, 0.0], top=2)
    expected = torch.log_softmax(logits / torch.tensor([[0.5], [1.0]]), dim=-1)  # greedy: temperature 1
    assert out[0][0] == pytest.approx(float(expected[0, 1])) and out[1][0] == pytest.approx(float(expected[1, 1]))
    assert [i for i, _ in out[0][1]] == [0, 1] and [i for i, _ in out[1][1]] == [1, 2]
    assert out[0][1][0][1] == pytest.approx(float(expected[0, 0]))
    assert token_logprobs(logits, [0, 0])[0][1] == []
    never = token_logprobs(torch.tensor([[0.0, float("-inf")]]), [1])[0][0]
    assert never == -9999.0  # JSON has no -inf: clamped as OpenAI reports it
