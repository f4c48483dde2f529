"""
Midtraining: teach the base model the conversation format, tool use and multiple choice, on packed
rows of rendered conversations (like pretraining, every token trained).

python -m scripts.mid_train
torchrun --standalone --nproc_per_node=8 -m scripts.mid_train

The mixture takes every dataset it can load (hub, or NANOCHAT_DATA_DIR when offline) and says which.
"""

import argparse
import os
import sys

from nanochat.finetune import load_available
from scripts.finetune_cli import add_finetune_flags, check_finetune_flags, mixtures, run

PROJECT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def build_mixture():
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    identity = os.path.join(PROJECT_DATA, "identity_conversations.jsonl")
    train_tasks, summary = load_available([
        ("SmolTalk train", lambda: SmolTalk(split="train")),
        ("MMLU auxiliary_train", lambda: MMLU(subset="auxiliary_train", split="train")),
        ("GSM8K train", lambda: GSM8K(subset="main", split="train")),
        ("identity conversations", lambda: CustomJSON(filepath=identity)),
        ("SimpleSpelling", lambda: SimpleSpelling(size=2000, split="train")),
        ("SpellingBee", lambda: SpellingBee(size=800, split="train")),
    ])
    val_tasks, _ = load_available([
        ("SmolTalk test", lambda: SmolTalk(split="test", stop=1000)),
        ("GSM8K test", lambda: GSM8K(subset="main", split="test", stop=200)),
    ])
    if not train_tasks:
        return None, None, summary
    return (*mixtures(train_tasks, val_tasks), summary)


def main(argv=None):
    p = argparse.ArgumentParser(description="Midtraining on conversations")
    add_finetune_flags(p, source="base", dest="mid", lr_frac=1.0, max_seq_len=2048, device_batch_size=32, examples_per_step=256)
    args = p.parse_args(argv)
    check_finetune_flags(p, args)
    return run(args, build_mixture, packed=True, section="Midtraining",
               no_data_hint="Go online (Hugging Face hub) or set NANOCHAT_DATA_DIR to a local mirror (gsm8k/, chat_sft/).")


if __name__ == "__main__":
    sys.exit(main())
