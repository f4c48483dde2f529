"""scripts/chat_cli.py against tiny checkpoints the test writes."""

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 30, "hello world, how are you today? " * 30]


@pytest.fixture
def checkpoints(isolated_base_dir):
    tokenizer = RustBPETokenizer.train_from_iterator(iter(CORPUS), 300)
    tokenizer.save(str(isolated_base_dir / "tokenizer"))
    for source_dir, tag, n_layer in [("base_checkpoints", "d2", 2), ("chatsft_checkpoints", "d2", 2),
                                     ("chatsft_checkpoints", "d1", 1)]:
        torch.manual_seed(n_layer)
        model = GPT(GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer, n_head=2,
                              n_kv_head=2, n_embd=32))
        model.init_weights()
        save_checkpoint(str(isolated_base_dir / source_dir / tag), 5, model.state_dict(), None,
                        dict(model_config=model.config_dict()))
    return isolated_base_dir


@pytest.fixture
def chat(checkpoints, run_main):
    def run(*args, stdin="", expect=0):
        return run_main("scripts.chat_cli", args, expect=expect, stdin=stdin)
    return run


def test_one_shot_prompts(chat):
    out = chat("-i", "base", "-p", "the quick brown", "-t", "0", "-m", "8")
    assert "Traceback" not in out
    out = chat("-i", "sft", "-g", "d2", "-p", "hello", "-t", "0.8", "-k", "20", "--top-p", "0.9", "-m", "8")
    assert "Assistant:" in out
    out = chat("-i", "sft", "-g", "d2", "-p", "hello", "-t", "0", "-m", "12",
               "--speculative-proposals", "3", "--draft-model-tag", "d1")
    assert "[speculative:" in out and "drafts accepted" in out
    out = chat("-i", "sft", "-g", "d2", "-p", "hello hello hello", "-t", "0", "-m", "12",
               "--speculative-proposals", "3", "--draft-model-tag", "ngram")
    assert "[speculative:" in out


def test_dtype_flag(chat):
    greedy = ("-i", "base", "-p", "the quick brown", "-t", "0", "-m", "8")
    assert chat(*greedy, "--dtype", "float32") == chat(*greedy)  # auto is fp32 for inference on a CPU
    out = chat(*greedy, "--dtype", "bfloat16")  # bf16 autocast, here on the CPU
    assert out.strip() and "Traceback" not in out
    assert "invalid choice" in chat(*greedy, "--dtype", "fp8", expect=2)


def test_interactive_session(chat):
    out = chat("-i", "sft", "-g", "d2", "-t", "0", "-m", "6", stdin="hi there\nclear\nhow are you\nquit\n")
    assert out.count("Assistant:") == 2 and "(conversation cleared)" in out


def test_errors(chat, isolated_base_dir):
    assert "temperature must be >= 0" in chat("-t", "-1", expect=2)
    assert "top_p must be in (0, 1]" in chat("--top-p", "0", expect=2)
    assert "--draft-model-tag" in chat("--speculative-proposals", "2", expect=2)
    out = chat("-i", "rl", "-p", "hi", expect=1)
    assert "no checkpoints directory" in out and "Traceback" not in out
    out = chat("-i", "sft", "-g", "d2", "-p", "hello " * 200, expect=1)
    assert "context is 128" in out
