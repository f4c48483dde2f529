import pytest
import torch

from nanochat.engine import Engine
from nanochat.kv_cache import KVCache
from nanochat.tools import calculator
from nanochat.gpt import GPTConfig
from tests.conftest import tiny_gpt

def tiny_model(vocab_size, attention="mha", n_kv_head=4, seed=0, sequence_len=128):
    return tiny_gpt(vocab_size, seed, proj_std=0.05, sequence_len=sequence_len, n_head=4, n_kv_head=n_kv_head,
                    n_embd=64, attention=attention)


def naive_greedy(model, prompt, max_tokens, terminal):
    """Reference: a full forward over the whole sequence for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token in terminal:
                break
            ids.append(token)
    return ids


def terminal_ids(tokenizer):
    return {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}


@pytest.mark.parametrize("attention,n_kv_head", [("mha", 4), ("gqa", 2), ("mla", 4)])
def test_cached_generation_equals_naive(tokenizer, attention, n_kv_head):
    model = tiny_model(tokenizer.get_vocab_size(), attention, n_kv_head)
    prompt = tokenizer.encode("the quick brown", prepend="<|bos|>")
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=30, temperature=0.0)
    assert results[0] == naive_greedy(model, prompt, 30, terminal_ids(tokenizer))
    assert masks[0] == [0] * len(prompt) + [1] * (len(results[0]) - len(prompt))


@pytest.mark.parametrize("attention,n_kv_head", [("mha", 4), ("gqa", 2), ("mla", 4)])
def test_multi_prompt_batch_equals_one_by_one(tokenizer, attention, n_kv_head):
    model = tiny_model(tokenizer.get_vocab_size(), attention, n_kv_head)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in range(3, 41, 3)]  # lengths 3..39
    engine = Engine(model, tokenizer)
    batched, _ = engine.generate_batch(prompts, max_tokens=16, temperature=0.0)
    alone = [engine.generate_batch(p, max_tokens=16, temperature=0.0)[0][0] for p in prompts]
    assert len(batched) == len(prompts)
    assert batched == alone
    assert [r[:len(p)] for r, p in zip(batched, prompts)] == prompts


def test_num_samples_share_prompt_and_seed_reproduces(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello world", prepend="<|bos|>")
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=2)
    assert a == b and a != c
    assert len(a) == 4 and all(r[:len(prompt)] == prompt for r in a)
    assert len({tuple(r) for r in a}) > 1  # samples differ from each other


def test_generate_streams_columns(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    steps = list(Engine(model, tokenizer).generate([1, 2, 3], num_samples=3, max_tokens=5, temperature=1.0))
    assert 1 <= len(steps) <= 5
    assert all(len(column) == 3 and len(masks) == 3 for column, masks in steps)


def test_max_tokens_and_context_limit(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size(), sequence_len=32)
    engine = Engine(model, tokenizer)
    steps = list(engine.generate(list(range(1, 29)), max_tokens=100, temperature=1.0))
    assert len(steps) <= 4  # only 4 positions left in the 32-token context


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT: whatever the input, the token at position t+1 is script[t+1] (by a wide margin)."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.dummy.device

    def kv_cache_layout(self):
        return {"k": (1, 1)}

    def forward(self, idx, kv_cache=None, logits_at=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(T):
                nxt = int(kv_cache.lengths[b]) + t + 1
                logits[b, t, self.script[min(nxt, len(self.script) - 1)]] = 20.0
        kv_cache.advance(T)
        if logits_at is not None:
            return logits[torch.arange(B), logits_at].unsqueeze(1)
        return logits


def test_calculator_tool_use_forces_output(tokenizer):
    s = tokenizer.encode_special
    expression = tokenizer.encode("12*3+4")
    prompt = [tokenizer.get_bos_token_id(), s("<|assistant_start|>")]
    # the model "writes" a python call; the engine must force the result in and keep going
    script = prompt + [s("<|python_start|>"), *expression, s("<|python_end|>")] + [65] * 20 + [s("<|assistant_end|>")]
    model = ScriptedModel(script, tokenizer.get_vocab_size())
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=60, temperature=0.0)
    forced = [s("<|output_start|>"), *tokenizer.encode("40"), s("<|output_end|>")]
    start = len(prompt) + len(expression) + 2
    assert results[0][:start] == script[:start]
    assert results[0][start:start + len(forced)] == forced
    assert masks[0][start:start + len(forced)] == [0] * len(forced)
    assert masks[0][len(prompt):start] == [1] * (start - len(prompt))


def test_refused_tool_call_forces_nothing(tokenizer):
    s = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id()]
    script = prompt + [s("<|python_start|>"), *tokenizer.encode("__import__('os')"), s("<|python_end|>"), 70, 71,
                       s("<|assistant_end|>")]
    model = ScriptedModel(script, tokenizer.get_vocab_size())
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert results[0] == script[:-1] and 0 not in masks[0][1:]


@pytest.mark.parametrize("expression,answer", [
    ("1+2", "3"), ("3*(4+5)/2", "13.5"), ("2**10", "1024"), ("10/4", "2.5"), ("-7//2", "-4"), ("1,000*3", "3000"),
    ("'strawberry'.count('r')", "3"), ('"a,b,c".count(",")', "2"), ("0.1+0.2", "0.3"),
])
def test_calculator_arithmetic(expression, answer):
    assert calculator(expression) == answer


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "(1).__class__.__bases__", "x + 1",
    "9**9**9", "10**1000", "2**100000", "1/0", "'a' * 10**9", "len('abc')", "'abc'.upper()", "[1, 2, 3]",
    "lambda: 1", "exec('1')", "eval('1+1')", "'a'.count('a', 0)", "().__class__", "1 if True else 2", "",
    "1+" * 200 + "1", "globals()", "'abc'.count(__import__('os'))", "True + 1", "1e308 * 10",
])
def test_calculator_refuses_everything_else(expression):
    assert calculator(expression) is None


def test_beam_search(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the lazy", prepend="<|bos|>")
    greedy = engine.generate_batch(prompt, max_tokens=8, temperature=0.0)[0][0]
    assert engine.beam_search(prompt, num_beams=1, top_k=1, max_tokens=8)[0][0] == greedy
    beams = engine.beam_search(prompt, num_beams=4, top_k=3, max_tokens=8, min_length=5.0, alpha=1.2)
    assert len(beams) == 4 and len({tuple(b) for b, _ in beams}) == 4
    assert any(b[-1] in terminal_ids(tokenizer) for b, _ in beams)  # this seed has a finished (frozen) beam
    scores = [score for _, score in beams]
    assert scores == sorted(scores, reverse=True)
    # each score equals the sequence's log-probability under a plain forward, length-penalized
    with torch.no_grad():
        for tokens, score in beams:
            logprobs = torch.log_softmax(model(torch.tensor([tokens]))[0, :-1], dim=-1)
            generated = tokens[len(prompt):]
            total = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(generated))
            assert score == pytest.approx(total / ((5.0 + len(generated)) / 6.0) ** 1.2, abs=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tokens=[]), "non-empty"),
    (dict(tokens=[[1, 2], []]), "prompt 1 is empty"),
    (dict(tokens=list(range(1, 130))), "context is 128"),
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-5), "max_tokens must be a positive integer"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.2), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be a non-negative integer"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(num_samples=0), "num_samples must be an integer >= 1"),
    (dict(num_samples=2, speculative_num_tokens=3), "num_samples == 1"),
    (dict(speculative_num_tokens=3), "needs a drafter"),
    (dict(tokens=[1, 10_000]), "outside"),
])
def test_bad_input_is_a_clear_value_error(tokenizer, kwargs, message):
    engine = Engine(tiny_model(tokenizer.get_vocab_size()), tokenizer)
    kwargs = dict(dict(tokens=[1, 2, 3]), **kwargs)
    with pytest.raises(ValueError, match=message):
        engine.generate_batch(**kwargs)
    with pytest.raises(ValueError, match=message):
        next(engine.generate(**kwargs))


def test_kv_cache_reorder_grows_capacity():
    cache = KVCache(2, 4, 1, {"k": (1, 2)}, "cpu")
    cache.tensors["k"][0, 1, :3] = 5.0
    cache.set_lengths([1, 3])
    cache.reorder([1, 1, 0], seq_len=10)
    assert cache.tensors["k"].shape == (1, 3, 10, 1, 2) and cache.lengths.tolist() == [3, 3, 1]
    assert (cache.tensors["k"][0, 0, :3] == 5).all() and (cache.tensors["k"][0, 2] == 0).all()


def test_per_row_sampling_parameters(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    greedy = engine.generate_batch(prompts, max_tokens=10, temperature=0.0)[0]
    mixed = engine.generate_batch(prompts, max_tokens=10, temperature=[0.0, 1.0], top_k=[None, 5], seed=4)[0]
    assert mixed[0] == greedy[0]  # the greedy row is unaffected by its sampled neighbour
    with pytest.raises(ValueError, match="one value per row"):
        engine.generate_batch(prompts, max_tokens=4, temperature=[0.5])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate_batch(prompts, max_tokens=4, top_p=[0.5, 0.0])


def test_kv_cache_view_writes_through_and_copy_row(tokenizer):
    """A view over some rows is the same storage: a forward on it fills those rows of the big cache."""
    model = tiny_model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("the quick brown", prepend="<|bos|>")
    cache = KVCache.for_model(model, 4, 64)
    view = cache.view(2, 3)
    with torch.no_grad():
        via_view = model(torch.tensor([prompt]), kv_cache=view)[0, -1]
    assert cache.lengths.tolist() == [0, 0, len(prompt), 0]
    cache.copy_row(2, 0)
    assert cache.lengths.tolist() == [len(prompt), 0, len(prompt), 0]
    for t in cache.tensors.values():
        assert torch.equal(t[:, 0, :len(prompt)], t[:, 2, :len(prompt)]) and t[:, 2, :len(prompt)].abs().sum() > 0
    alone = KVCache.for_model(model, 1, 64)
    with torch.no_grad():
        reference = model(torch.tensor([prompt]), kv_cache=alone)[0, -1]
        next_from_copy = model(torch.tensor([[5]]), kv_cache=cache.view(0, 1))[0, -1]
        next_alone = model(torch.tensor([[5]]), kv_cache=alone)[0, -1]
    assert torch.allclose(via_view, reference, atol=1e-5) and torch.allclose(next_from_copy, next_alone, atol=1e-5)
