"""The continuous-batching scheduler, in-process: outputs must match plain Engine generation."""

import asyncio

import pytest
import torch

from nanochat.engine import Engine
from nanochat.serving.scheduler import Scheduler
from nanochat.serving.tickets import Overloaded, Ticket
from tests.conftest import tiny_gpt

@pytest.fixture(scope="module", params=[("mha", 4), ("mla", 4)])
def model(request, tokenizer):
    attention, n_kv_head = request.param
    # non-zero projections so different prompts give different text
    return tiny_gpt(tokenizer.get_vocab_size(), proj_std=0.05, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                    attention=attention)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 256, (4 + 5 * i,), generator=g).tolist() for i in range(n)]


def greedy_reference(model, tokenizer, prompt, max_tokens):
    result, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return result[0][len(prompt):]


async def collect(ticket, initial=()):
    """Tokens per row and finish reasons, until every row has finished (initial: events already read)."""
    tokens, finish = [[] for _ in range(ticket.num_rows)], [None] * ticket.num_rows
    batches = [list(initial)]
    while None in finish:
        for kind, row, value in batches.pop() if batches else await asyncio.wait_for(ticket.events.get(), 30):
            assert kind != "error", value
            if kind == "token":
                tokens[row].append(value)
            else:
                finish[row] = value
    return tokens, finish


def run(scheduler, coroutine):
    scheduler.start()
    try:
        return asyncio.run(coroutine)
    finally:
        scheduler.shutdown()


def test_staggered_requests_match_engine_greedy(model, tokenizer):
    """Requests arriving while others decode join between steps and still get exactly their greedy output."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    ps = prompts(6)

    async def main():
        tickets = []
        for p in ps:
            tickets.append(Ticket([p], 1, 20, 0.0, None, None))
            scheduler.submit(tickets[-1])
            await asyncio.sleep(0.003)  # land at different decode steps
        return [await collect(t) for t in tickets]

    results = run(scheduler, main())
    for p, (tokens, finish) in zip(ps, results):
        assert tokens[0] == greedy_reference(model, tokenizer, p, 20)
        assert finish[0] in ("stop", "length")
    assert scheduler.counters["decode_steps"] > 0 and scheduler.running == [] and scheduler.prefilling == [] and scheduler.running_tickets == set()


def test_mixed_sampling_settings_in_one_batch(model, tokenizer):
    """A greedy request batched with hot-sampled ones is unaffected by their settings."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    p = prompts(1, seed=3)[0]

    async def main():
        greedy = Ticket([p], 1, 24, 0.0, None, None)
        others = [Ticket([q], 2, 24, 1.5, 20, 0.9) for q in prompts(3, seed=4)]
        for t in [others[0], greedy, *others[1:]]:
            scheduler.submit(t)
        result = await collect(greedy)
        for t in others:
            await collect(t)
        return result

    tokens, _ = run(scheduler, main())
    assert tokens[0] == greedy_reference(model, tokenizer, p, 24)


def test_samples_share_the_prefill_and_seed_reproduces(model, tokenizer):
    p = prompts(1, seed=5)[0]

    def sample(seed, max_batch_size):
        scheduler = Scheduler(model, tokenizer, max_batch_size=max_batch_size)
        return run(scheduler, collect_one(seed, scheduler))[0]

    async def collect_one(seed, scheduler):
        ticket = Ticket([p], 3, 16, 1.0, None, None, seed=seed)
        scheduler.submit(ticket)
        return await collect(ticket)

    first = sample(7, 4)
    assert len(first) == 3
    assert sample(7, 4) == first  # same seed, same tokens
    assert sample(7, 16) == first  # the cache size does not matter either
    assert sample(8, 4) != first  # a different seed samples differently
    assert len({tuple(t) for t in first}) > 1  # the three samples are not copies of one another


@pytest.mark.parametrize("prefill_chunk_tokens", [512, 4])  # 4: the samples share a chunked (staged) prefill
def test_greedy_samples_are_identical(model, tokenizer, prefill_chunk_tokens):
    p = prompts(3, seed=6)[-1]  # 15 tokens
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, prefill_chunk_tokens=prefill_chunk_tokens)

    async def main():
        ticket = Ticket([p], 3, 12, 0.0, None, None)
        scheduler.submit(ticket)
        return await collect(ticket)

    tokens, _ = run(scheduler, main())
    assert tokens == [greedy_reference(model, tokenizer, p, 12)] * 3


def test_cancel_frees_the_rows_at_once(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=2)

    async def main():
        ticket = Ticket([prompts(1)[0]], 2, 10_000, 1.0, None, None)  # would run to the end of the context
        scheduler.submit(ticket)
        await asyncio.wait_for(ticket.events.get(), 30)
        ticket.cancel()
        scheduler.wake()
        for _ in range(200):
            if scheduler.rows_in_use() == 0:
                break
            await asyncio.sleep(0.005)
        generated = scheduler.counters["generated_tokens"]
        await asyncio.sleep(0.1)
        return generated

    generated = run(scheduler, main())
    assert scheduler.rows_in_use() == 0 and scheduler.running_tickets == set()
    assert scheduler.counters["generated_tokens"] == generated  # nothing more was generated after leaving
    assert generated < 2 * (128 - len(prompts(1)[0]))


def test_queue_limit_raises_overloaded(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=1, max_queued_requests=1)  # not started: nothing drains

    async def main():
        scheduler.submit(Ticket([[1, 5]], 1, 4, 0.0, None, None))  # fits in the free slot
        scheduler.submit(Ticket([[1, 6]], 1, 4, 0.0, None, None))  # waits in the queue
        with pytest.raises(Overloaded) as e:
            scheduler.submit(Ticket([[1, 7]], 1, 4, 0.0, None, None))
        assert e.value.retry_after >= 1
        with pytest.raises(ValueError, match="max-batch-size"):
            scheduler.submit(Ticket([[1, 7]], 2, 4, 0.0, None, None))

    asyncio.run(main())


def test_finish_reasons_and_context_limit(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=2)
    long_prompt = [1] + [7] * 120  # 121 of 128 context tokens: only 7 can be generated

    async def main():
        ticket = Ticket([long_prompt, [1, 9, 9]], 1, 50, 0.0, None, None)
        scheduler.submit(ticket)
        return await collect(ticket)

    tokens, finish = run(scheduler, main())
    reference = greedy_reference(model, tokenizer, long_prompt, 50)
    assert tokens[0] == reference and len(reference) <= 7
    assert finish[0] == ("length" if len(reference) == 7 else "stop")


def test_speculative_lone_request_and_rejoin_stay_exact(model, tokenizer):
    """Greedy speculative output equals plain greedy, also when a second request forces a rejoin mid-way."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, draft="ngram", speculative_proposals=3)
    a, b = prompts(2, seed=9)

    async def main():
        first = Ticket([a], 1, 60, 0.0, None, None)
        scheduler.submit(first)
        seen = await asyncio.wait_for(first.events.get(), 30)  # it is running speculatively now
        assert scheduler.solo is not None
        second = Ticket([b], 1, 20, 0.0, None, None)
        scheduler.submit(second)
        return await collect(first, seen), await collect(second)

    (tokens_a, _), (tokens_b, _) = run(scheduler, main())
    assert tokens_a[0] == greedy_reference(model, tokenizer, a, 60)
    assert tokens_b[0] == greedy_reference(model, tokenizer, b, 20)
    assert scheduler.speculative_counts()[0] > 0


def test_speculative_with_a_draft_model_is_exact(model, tokenizer):
    draft = tiny_gpt(tokenizer.get_vocab_size(), seed=1, n_layer=1)
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, draft=draft, speculative_proposals=4)
    p = prompts(1, seed=11)[0]

    async def main():
        ticket = Ticket([p], 1, 30, 0.0, None, None)
        scheduler.submit(ticket)
        return await collect(ticket)

    tokens, _ = run(scheduler, main())
    assert tokens[0] == greedy_reference(model, tokenizer, p, 30)
    assert scheduler.speculative_counts()[0] > 0


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(model, tokenizer):
    """A long prompt is read a chunk per step while a running stream keeps decoding; outputs stay exact."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, prefill_chunk_tokens=8)
    short, long_prompt = prompts(1, seed=12)[0], prompts(20, seed=13)[-1]  # 5 and 100 tokens
    order = []  # (ticket name, events) in the order the scheduler thread delivers them

    def recording(ticket, name):
        send = ticket.send
        ticket.send = lambda events: (order.append((name, events)), send(events))
        return ticket

    async def main():
        first = recording(Ticket([short], 1, 100, 0.0, None, None), "short")
        scheduler.submit(first)
        seen = await asyncio.wait_for(first.events.get(), 30)  # running now
        second = recording(Ticket([long_prompt], 1, 10, 0.0, None, None), "long")
        submitted_at = len(order)
        scheduler.submit(second)
        return await collect(first, seen), await collect(second), submitted_at

    (short_tokens, _), (long_tokens, _), submitted_at = run(scheduler, main())
    assert short_tokens[0] == greedy_reference(model, tokenizer, short, 100)
    assert long_tokens[0] == greedy_reference(model, tokenizer, long_prompt, 10)
    first_long = next(i for i, (name, _) in enumerate(order) if name == "long")
    short_steps_meanwhile = sum(name == "short" for name, _ in order[submitted_at:first_long])
    assert short_steps_meanwhile >= len(long_prompt) // 8 - 1  # about one decode step per prefill chunk


class DeviceOnlyGenerator:
    """Stands in for a CUDA generator on this CPU machine: host code that samples with it fails, as on a GPU."""

    device = torch.device("cuda")

    def __getattr__(self, name):
        raise AssertionError(f"the device generator was used from host code ({name})")


def test_speculative_unseeded_request_never_samples_with_the_device_generator(model, tokenizer):
    """On CUDA, torch.randint(..., generator=<cuda generator>) without device= raises: every lone unseeded
    request failed. Drawing its seed must not touch the replica's (device) generator at all."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, draft="ngram", speculative_proposals=3)
    scheduler.generator = DeviceOnlyGenerator()
    p = [1] + [40, 41, 42, 43] * 6  # repeats: the n-gram drafter has something to propose

    async def main():
        ticket = Ticket([p], 1, 12, 0.8, None, None)  # sampled, no seed
        scheduler.submit(ticket)
        return await collect(ticket)

    tokens, finish = run(scheduler, main())  # collect() fails on an error event
    assert finish[0] in ("length", "stop") and 1 <= len(tokens[0]) <= 12
    assert scheduler.speculative_counts()[0] > 0


def test_kv_cache_is_in_the_compute_dtype(model, tokenizer, monkeypatch):
    """Under a bf16 policy the preallocated cache is bf16, half of what the fp32 weights' dtype would take."""
    import nanochat.serving.scheduler as scheduler_module
    monkeypatch.setattr(scheduler_module, "autocast_context", lambda device_type: torch.autocast(device_type, torch.bfloat16))
    scheduler = Scheduler(model, tokenizer, max_batch_size=2)
    assert {t.dtype for t in scheduler.kv_cache.tensors.values()} == {torch.bfloat16}

    async def main():
        ticket = Ticket(prompts(2, seed=13), 1, 10, 0.0, None, None)
        scheduler.submit(ticket)
        return await collect(ticket)

    tokens, finish = run(scheduler, main())
    assert [len(t) for t in tokens] == [10, 10] and finish == ["length", "length"]


def test_a_subnormal_temperature_is_greedy_and_harms_no_one(model, tokenizer):
    """A float32 subnormal temperature overflowed logits / temperature: sampling raised and failed every row of
    the batch (1e-45, the smallest: this model's logits are small, under 0.03)."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    p, others = prompts(1, seed=14)[0], prompts(3, seed=15)

    async def main():
        tiny = Ticket([p], 2, 16, 1e-45, None, None)
        hot = [Ticket([q], 1, 16, 0.9, 20, 0.95) for q in others]
        for t in [hot[0], tiny, *hot[1:]]:
            scheduler.submit(t)
        return await collect(tiny), [await collect(t) for t in hot]

    (tokens, _), hot_results = run(scheduler, main())
    assert tokens == [greedy_reference(model, tokenizer, p, 16)] * 2
    assert all(len(t[0]) == 16 or f[0] == "stop" for t, f in hot_results)


def test_a_failing_sequence_ends_only_its_own_request(model, tokenizer):
    """An exception while processing one sequence's token: its request gets an error event, the rest go on exactly."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    ps = prompts(3, seed=16)

    async def main():
        tickets = [Ticket([q], 1, 20, 0.0, None, None) for q in ps]
        bad = Ticket([ps[0]], 2, 20, 0.0, None, None)
        for t in [tickets[0], bad, *tickets[1:]]:
            scheduler.submit(t)
        tool, calls = bad.sequences[1].tool, []

        def next_then_fail(token):
            calls.append(token)
            if len(calls) == 5:
                raise RuntimeError("injected")
            return type(tool).next(tool, token)
        tool.next = next_then_fail
        events = []
        while not any(kind == "error" for kind, _, _ in events):
            events += await asyncio.wait_for(bad.events.get(), 30)
        return [await collect(t) for t in tickets], events

    results, bad_events = run(scheduler, main())
    assert bad_events[-1] == ("error", None, "generation failed: RuntimeError")
    assert sum(kind == "token" and row == 1 for kind, row, _ in bad_events) == 4
    for q, (tokens, _) in zip(ps, results):
        assert tokens[0] == greedy_reference(model, tokenizer, q, 20)
    assert scheduler.rows_in_use() == 0 and scheduler.running_tickets == set()


@pytest.mark.parametrize("prefill_chunk_tokens", [512, 8])  # 8: the new turn's rest is prefilled in chunks
def test_the_next_turn_reuses_the_cached_conversation_and_stays_exact(model, tokenizer, prefill_chunk_tokens):
    """Turn 2 sends turn 1's prompt + reply + a new message: the cached KV is copied, the output is unchanged."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, prefill_chunk_tokens=prefill_chunk_tokens)
    first = prompts(4, seed=17)[-1]  # 20 tokens

    async def turn(context, max_tokens):
        ticket = Ticket([context], 1, max_tokens, 0.0, None, None)
        scheduler.submit(ticket)
        return (await collect(ticket))[0][0]

    async def main():
        reply = await turn(first, 30)
        second = first + reply + [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        return second, await turn(second, 20)

    second, tokens = run(scheduler, main())
    assert tokens == greedy_reference(model, tokenizer, second, 20)
    counters = scheduler.counters
    assert counters["prefix_hits"] == 1 and counters["prefix_lookups"] == 2
    assert counters["prefix_tokens_reused"] >= len(first) + 29  # all but the last reply token was in the cache


def test_no_prefix_cache_rows_means_no_reuse(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, prefix_cache_rows=0)
    p = prompts(4, seed=18)[-1]

    async def main():
        for _ in range(2):
            ticket = Ticket([p], 1, 8, 0.0, None, None)
            scheduler.submit(ticket)
            assert (await collect(ticket))[0][0] == greedy_reference(model, tokenizer, p, 8)

    run(scheduler, main())
    assert scheduler.counters["prefix_hits"] == 0 and scheduler.kv_cache.batch_size == 2


def test_penalties_and_logit_bias_apply_to_their_row_only(model, tokenizer):
    """logit_bias +100 on one token makes greedy decoding emit only it; -100 on the plain greedy choice moves
    the first token; a request without them in the same batch keeps its exact greedy output."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    p = prompts(1, seed=5)[0]
    plain = greedy_reference(model, tokenizer, p, 8)
    forced_token = next(t for t in range(300) if t not in plain)

    async def main():
        tickets = [Ticket([p], 1, 8, 0.0, None, None),
                   Ticket([p], 1, 8, 0.0, None, None, penalties={"frequency_penalty": 0.0, "presence_penalty": 0.0,
                                                                 "logit_bias": {forced_token: 100.0}}),
                   Ticket([p], 1, 8, 0.0, None, None, penalties={"frequency_penalty": 0.0, "presence_penalty": 0.0,
                                                                 "logit_bias": {plain[0]: -100.0}})]
        for t in tickets:
            scheduler.submit(t)
        return [await collect(t) for t in tickets]

    (same, _), (forced, _), (moved, _) = run(scheduler, main())
    assert same[0] == plain
    assert forced[0] == [forced_token] * 8
    assert moved[0][0] != plain[0]
