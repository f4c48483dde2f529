import importlib
import io
import sys

import pytest


# text for a small BPE vocabulary: words, digits, arithmetic (the calculator tool's expressions)
CORPUS = ["the quick brown fox jumps over the lazy dog. " * 30, "hello world, numbers 12 345 6789 and 1+2=3. " * 30]


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-token tokenizer trained on CORPUS, once per test session (files whose tests need other text
    define their own `tokenizer` fixture, which takes precedence)."""
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(CORPUS), 300)


@pytest.fixture(autouse=True)
def isolated_base_dir(tmp_path, monkeypatch):
    """No test reads or writes the user's ~/.cache/nanochat: each gets its own NANOCHAT_BASE_DIR."""
    base_dir = tmp_path / "nanochat_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    return base_dir


@pytest.fixture
def run_main(capsys, monkeypatch):
    """
    Run a script's main(argv) in this process (no interpreter start or torch import: seconds saved per call)
    and return its stdout + stderr. expect: the exit code (argparse errors exit 2). Subprocesses are kept for
    what needs one (torchrun, kill, environment variables read at import).
    """
    def run(module, argv, expect=0, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        message = ""
        try:
            code = importlib.import_module(module).main(list(argv))
        except SystemExit as e:  # argparse exits 2; sys.exit("error: ...") exits 1 with the message
            code, message = (1, e.code + "\n") if isinstance(e.code, str) else (e.code, "")
        captured = capsys.readouterr()
        output = captured.out + captured.err + message
        assert code == expect, f"{module} {argv} exited {code}:\n{output[-3000:]}"
        return output
    return run


def tiny_gpt(vocab_size, seed=0, proj_std=None, **config):
    """
    A small GPT in eval mode, seeded: GPTConfig(vocab_size=vocab_size, **config) over a 2-layer, 2-head,
    width-32, 128-token default. proj_std re-draws the residual projections (zero at init) with that std, so
    that different inputs give different outputs (what generation tests compare).
    """
    import torch

    from nanochat.gpt import GPT, GPTConfig

    config = dict(sequence_len=128, n_layer=2, n_head=2, n_kv_head=config.get("n_head", 2), n_embd=32) | config
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, **config))
    model.init_weights()
    if proj_std is not None:
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, std=proj_std)
    return model.eval()
