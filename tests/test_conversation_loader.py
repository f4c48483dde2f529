"""nanochat.conversation_loader.ConversationLoader: SFT (padded, masked) and midtraining (packed) rows."""

import pytest
import torch

from nanochat.conversation_loader import ConversationLoader
from nanochat.tokenizer import RustBPETokenizer
from tests.conftest import tiny_gpt


@pytest.fixture(scope="module")
def tokenizer():
    text = ["hello there, how are you? I am fine, thank you. What is 2+2? It is 4. " * 20]
    return RustBPETokenizer.train_from_iterator(iter(text), 300)


def conversations(n):
    return [{"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 5)},
                          {"role": "assistant", "content": f"answer {i} " * (1 + i % 3)}]} for i in range(n)]


def test_padded_rows_train_on_assistant_tokens_only(tokenizer):
    data = conversations(10)
    loader = ConversationLoader(data, tokenizer, B=4, max_len=256)
    x, y = next(loader)
    assert x.shape == y.shape and x.shape[0] == 4
    bos = tokenizer.get_bos_token_id()
    assert (x[:, 0] == bos).all()
    for b in range(4):
        trained = y[b][y[b] >= 0].tolist()
        text = tokenizer.decode(trained)
        assert "answer" in text and "question" not in text  # user turns are never targets
        assert trained[-1] == tokenizer.encode_special("<|assistant_end|>")


def test_packed_rows_start_at_bos_and_fill(tokenizer):
    data = conversations(50)
    loader = ConversationLoader(data, tokenizer, B=3, max_len=48, packed=True)
    bos = tokenizer.get_bos_token_id()
    for _ in range(5):
        x, y = next(loader)
        assert (x[:, 0] == bos).all() and x.shape[1] <= 48
        assert (y >= 0).float().mean() > 0.7  # mostly real tokens, little padding
        # targets are the inputs shifted by one wherever both are real
        real = (y[:, :-1] >= 0) & (y[:, 1:] >= 0)
        assert torch.equal(x[:, 1:][real], y[:, :-1][real])


@pytest.mark.parametrize("packed", [False, True])
def test_resume_is_exact_and_epochs_reshuffle(tokenizer, packed):
    data = conversations(23)
    loader = ConversationLoader(data, tokenizer, B=4, max_len=40, packed=packed, seed=3)
    for _ in range(7):  # crosses an epoch boundary
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]
    resumed = ConversationLoader(data, tokenizer, B=4, max_len=40, packed=packed, seed=3, resume_state=state)
    for (x, y), (rx, ry) in zip(expected, [next(resumed) for _ in range(6)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_take_disjoint_examples(tokenizer):
    data = conversations(8)
    seen = []
    for rank in range(2):
        loader = ConversationLoader(data, tokenizer, B=4, max_len=64, rank=rank, world_size=2)
        x, _ = next(loader)
        seen.append({tokenizer.decode(row.tolist()).split("question ")[1].split()[0] for row in x})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


@pytest.mark.parametrize("packed", [False, True])
def test_every_batch_has_the_same_shape(tokenizer, packed):
    loader = ConversationLoader(conversations(30), tokenizer, B=3, max_len=40, packed=packed)
    for _ in range(12):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 40)  # a compiled model (dynamic=False) never sees a new shape


@pytest.mark.parametrize("packed", [False, True])
def test_fixed_shape_loss_equals_the_loss_without_trailing_padding(tokenizer, packed):
    """Padding to max_len changes nothing: it sits after every real token and carries no targets. The
    loader used to pad only to the longest row of the batch, which is the cropped batch here."""
    model = tiny_gpt(tokenizer.get_vocab_size())
    loader = ConversationLoader(conversations(30), tokenizer, B=4, max_len=128, packed=packed)
    cropped_any = False
    for _ in range(4):
        x, y = next(loader)
        longest = int((y >= 0).nonzero()[:, 1].max()) + 1  # past the last trained position: padding only
        cropped_any |= longest < 128
        fixed, cropped = model(x, y), model(x[:, :longest], y[:, :longest])
        torch.testing.assert_close(fixed, cropped, rtol=1e-6, atol=1e-6)
    assert cropped_any


def test_packed_rows_per_epoch_estimate_matches_the_loader(tokenizer):
    """finetune.estimate_packed_rows (how many steps an epoch of midtraining takes) counts the rows the loader's
    packing really fills, unfilled row ends included; mean length / row length undercounts them."""
    from nanochat.finetune import estimate_packed_rows
    data = conversations(200)
    max_len = 128  # 3-4 conversations a row, and a gap at its end
    loader = ConversationLoader(data, tokenizer, B=1, max_len=max_len, packed=True)
    rows = 0
    while loader.epoch == 0:  # the last row counted is the one that reached into the next epoch
        next(loader)
        rows += 1
    estimate = estimate_packed_rows(data, tokenizer, max_len, sample=len(data))
    lengths = [len(tokenizer.render_conversation(c, max_tokens=max_len + 1)[0]) for c in data]
    mean_based = round(sum(lengths) / (max_len + 1))
    assert abs(estimate - rows) <= 0.05 * rows, (estimate, rows)
    assert mean_based < 0.9 * rows  # what the estimate used to be
