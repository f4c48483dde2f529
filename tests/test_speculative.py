import pytest
import torch

from nanochat.engine import Engine
from nanochat.sampling import process_logits
from nanochat.speculative import (NgramDrafter, acceptance_gamma, entropy_gamma, expected_tokens_per_forward,
                                  verify)
from tests.conftest import tiny_gpt

def tiny_model(vocab_size, n_layer=2, attention="mha", seed=0, n_embd=64, init_std=0.05):
    return tiny_gpt(vocab_size, seed, proj_std=init_std, sequence_len=256, n_layer=n_layer, n_head=4, n_embd=n_embd,
                    attention=attention)


@pytest.mark.parametrize("attention", ["mha", "mla"])
@pytest.mark.parametrize("adaptive", [None, "entropy", "acceptance"])
def test_greedy_speculative_equals_plain(tokenizer, attention, adaptive):
    V = tokenizer.get_vocab_size()
    target, draft = tiny_model(V, 3, attention), tiny_model(V, 1, attention, seed=1)
    prompt = tokenizer.encode("the quick brown fox jumps over the lazy dog. the quick", prepend="<|bos|>")
    plain = Engine(target, tokenizer).generate_batch(prompt, max_tokens=50, temperature=0.0)[0][0]
    for drafter in (draft, target, "ngram"):  # a weak draft, a perfect draft, n-grams
        engine = Engine(target, tokenizer, draft=drafter)
        run = engine.speculative(prompt, max_tokens=50, temperature=0.0, speculative_num_tokens=4, adaptive=adaptive)
        assert engine.collect(run, [prompt])[0][0] == plain, drafter
        stats = run.stats
        assert stats["emitted"] == len(plain) - len(prompt) + (len(plain) - len(prompt) < 50)
        assert stats["accepted"] <= stats["drafted"]
    assert Engine(target, tokenizer, draft=target).generate_batch(
        prompt, max_tokens=50, temperature=0.0, speculative_num_tokens=4)[0][0] == plain


def test_perfect_draft_accepts_everything(tokenizer):
    target = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(target, tokenizer, draft=target)

    def run_stats(seed):  # adaptive=None: always 4 drafts, so tokens per forward can be checked against γ = 4
        run = engine.speculative([1, 2, 3], max_tokens=40, temperature=1.0, seed=seed, speculative_num_tokens=4,
                                 adaptive=None)
        engine.collect(run, [[1, 2, 3]])
        return run.stats

    stats = run_stats(3)
    assert stats["emitted"] == 31 and stats["acceptance_rate"] > 0.95  # this seed samples <|assistant_end|> early
    stats = run_stats(0)
    assert stats["emitted"] == 40  # this seed samples no terminal token
    # p and q agree up to float noise (one batched forward vs token-by-token), so nearly all are accepted
    assert stats["acceptance_rate"] > 0.95
    assert stats["tokens_per_target_forward"] > 0.8 * expected_tokens_per_forward(1.0, 4)


def _empirical_tv(samples, probs):
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).float()
    return float((counts / counts.sum() - probs).abs().sum() / 2)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9)])
def test_verify_preserves_target_distribution(sampling):
    """Two positions: the first emitted token ~ p_0; given d_0 accepted, the second ~ p_1."""
    torch.manual_seed(0)
    V, trials = 6, 20000
    p = process_logits(torch.randn(3, V) * 1.5, **sampling)  # (γ+1, V), γ = 2
    q = process_logits(torch.randn(2, V) * 1.5, **sampling)  # the draft's different opinion
    g = torch.Generator().manual_seed(1)
    likely_first = int((p[0] * q[0]).argmax())  # the draft most often proposed and accepted
    first, second = [], []
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        n, token = verify(p, drafts, q, g)
        emitted = drafts[:n] + [token]
        first.append(emitted[0])
        if n >= 1 and drafts[0] == likely_first:  # given the first draft was accepted, the next token ~ p_1
            second.append(emitted[1])
    assert _empirical_tv(first, p[0]) < 0.02
    assert len(second) > 500 and _empirical_tv(second, p[1]) < 0.05


def test_verify_one_hot_drafts_preserve_distribution():
    torch.manual_seed(0)
    V = 5
    p = torch.softmax(torch.randn(2, V), -1)
    g = torch.Generator().manual_seed(2)
    first = [(lambda n, t: ([3][:n] + [t])[0])(*verify(p, [3], None, g)) for _ in range(20000)]
    assert _empirical_tv(first, p[0]) < 0.02


class TinyVocabTokenizer:
    """A 16-token vocabulary: 10 ordinary tokens and the 6 special tokens the engine uses."""
    names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def encode_special(self, name):
        return 10 + self.names.index(name)

    def get_bos_token_id(self):
        return 10

    def get_pad_token_id(self):
        return 10

    def terminal_token_ids(self):
        return {10, 11}

    def encode(self, text):
        return [int(c) for c in text if c.isdigit()]

    def decode(self, ids):
        return "".join(str(i) for i in ids if i < 10)


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["model", "ngram"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.9, top_k=6, top_p=0.9)])
def test_speculative_sampling_matches_target_distribution(drafter, sampling):
    """End to end through the Engine on a 16-token model: the first generated token's empirical
    distribution over many seeds matches the target's exact (processed) distribution."""
    tokenizer, V = TinyVocabTokenizer(), 16
    target = tiny_model(V, 1, n_embd=32, seed=0, init_std=0.5)
    draft = tiny_model(V, 1, n_embd=32, seed=5, init_std=0.5) if drafter == "model" else "ngram"
    prompt = [10, 3, 1, 4, 1, 5, 3, 1, 4]  # repeats, so the n-gram drafter has something to propose
    with torch.no_grad():
        exact = process_logits(target(torch.tensor([prompt]))[:, -1], **sampling)[0]
    engine = Engine(target, tokenizer, draft=draft)
    trials, drafted, first = 3000, 0, []
    for seed in range(trials):
        run = engine.speculative(prompt, max_tokens=3, seed=seed, speculative_num_tokens=3, **sampling)
        first.append(next(run)[0][0])
        drafted += run.stats["drafted"]
    assert drafted > 0
    # expected TV of an exact sampler with 16 outcomes and 3000 draws is ~0.03; a wrong sampler is far off
    assert _empirical_tv(first, exact) < 0.06


def test_ngram_drafter():
    drafter = NgramDrafter(max_n=3, min_n=2)
    drafter.observe([1, 2, 3, 4, 1, 2, 3, 5, 1, 2])
    assert drafter.propose([1, 2], 3) == ([3, 5, 1], None)  # after (1, 2) comes 3; after (2, 3) the latest is 5
    assert drafter.propose([9, 9], 3) == ([], None)  # unknown context: no drafts
    single = NgramDrafter(max_n=2, min_n=2)
    single.observe([7, 8, 7, 9, 7, 9])
    assert single.propose([7], 1) == ([9], None)  # 9 follows 7 twice, 8 once
    fallback = NgramDrafter(max_n=3, min_n=2, stop_when_unknown=False)
    fallback.observe([4, 4, 4, 6])
    assert fallback.propose([9, 9], 2) == ([4, 4], None)  # unigram back-off
    filler = NgramDrafter(max_n=2, min_n=2, filler_top_k=1)
    filler.observe([1, 2])
    filler.observe_target([1, 2, 5], torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9]))
    assert filler.propose([5], 1) == ([7], None)
    with pytest.raises(ValueError):
        NgramDrafter(max_n=2, min_n=3)


def test_ngram_drafter_trims_by_learned_acceptance():
    tokens = [1, 2, 1, 2, 1]  # every draft below continues a 1-token context seen twice, always the same way
    untrimmed = NgramDrafter(max_n=2, min_n=2)
    assert untrimmed.propose(tokens, 4) == ([2, 1, 2, 1], None)
    rejected, accepted = (NgramDrafter(max_n=2, min_n=2, cost=0.1, trim=True) for _ in range(2))
    assert rejected.propose(tokens, 4) == ([2, 1, 2, 1], None)  # a kind never verified starts at 0.92: draft on
    for _ in range(20):
        rejected.propose(tokens, 4)
        rejected.sync(tokens + [9], None)  # the target says 9 where the first draft said 2
        accepted.propose(tokens, 4)
        accepted.sync(tokens + [2, 1, 2, 1, 2], None)
    # the first draft is examined and rejected until the estimate, 1.84 / (rejections + 2), reaches 0.1: then one
    # draft would add 0.1 expected tokens for 0.1 of cost, and the proposals are empty
    assert list(rejected.outcomes.values()) == [[0, 17]]
    assert rejected.propose(tokens, 4) == ([], None)
    assert list(accepted.outcomes.values()) == [[80, 80]]
    assert accepted.propose(tokens, 4) == ([2, 1, 2, 1], None)


def test_ngram_drafter_pays_the_fixed_cost_of_a_wider_verify_only_for_enough_tokens():
    # a CPU verify forward of 2+ positions costs a fixed extra (fixed_cost) plus a little per position (cost)
    tokens = [1, 2, 1, 2, 1]  # every draft continues a 1-token context seen twice, always the same way
    kind = (1, 2, True)
    for fixed_cost, (accepted, examined), expected in [(0.0, (30, 100), [2, 1]), (0.5, (30, 100), []),
                                                      (0.5, (80, 100), [2, 1, 2, 1])]:
        drafter = NgramDrafter(max_n=2, min_n=2, cost=0.05, fixed_cost=fixed_cost, trim=True)
        drafter.outcomes[kind] = [accepted, examined]
        # acceptance a = (accepted + 1.84) / (examined + 2); k drafts: (1 + a + ... + a^k) / (1 + fixed_cost + 0.05 k)
        # a = 0.31: 1.41 / 1.1 at k = 2 is the best without a fixed cost, but 1.31 / 1.55 < 1 with one: no drafts
        # a = 0.80: four drafts give 3.38 tokens for 1.7 of cost
        assert drafter.propose(tokens, 4) == (expected, None)
        assert drafter._proposal[2] == [kind] * len(expected)


def test_adaptive_gamma_rules():
    uniform = torch.full((100,), 0.01)
    peaked = torch.zeros(100)
    peaked[0] = 1.0
    assert entropy_gamma(uniform, 1, 8)[0] == 1
    assert entropy_gamma(peaked, 1, 8)[0] == 8
    assert acceptance_gamma(0.95, 0.0, 1, 8) == 8
    assert acceptance_gamma(0.1, 0.3, 1, 8) == 1
    assert 1 < acceptance_gamma(0.8, 0.1, 1, 8) <= 8
    assert expected_tokens_per_forward(0.5, 3) == pytest.approx(1.875)


def test_bad_speculative_options(tokenizer):
    engine = Engine(tiny_model(tokenizer.get_vocab_size()), tokenizer, draft="ngram")
    with pytest.raises(ValueError, match="adaptive"):
        engine.generate_batch([1, 2], max_tokens=4, speculative_num_tokens=2, adaptive="magic")
    with pytest.raises(ValueError, match="gamma_min"):
        engine.generate_batch([1, 2], max_tokens=4, speculative_num_tokens=2, gamma_min=3)
    with pytest.raises(ValueError, match="positive integer"):
        engine.generate_batch([1, 2], max_tokens=4, speculative_num_tokens=-1)
    other = Engine(tiny_model(tokenizer.get_vocab_size()), tokenizer, draft=tiny_model(400))
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        other.generate_batch([1, 2], max_tokens=4, speculative_num_tokens=2)
