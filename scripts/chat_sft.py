"""
Supervised finetuning: one conversation per row, loss on the assistant's tokens only.

python -m scripts.chat_sft                          # from the midtrained model (-i mid is the default source)
python -m scripts.chat_sft --source base            # straight from the base model
torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
python -m scripts.chat_sft --custom-json my_chats.jsonl   # add your own {"messages": [...]} conversations

The mixture takes every dataset it can load (hub, or NANOCHAT_DATA_DIR when offline) and says which.
"""

import argparse
import os
import sys

from nanochat.finetune import load_available
from scripts.finetune_cli import add_finetune_flags, check_finetune_flags, mixtures, run

PROJECT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
PROJECT_CONVERSATIONS = ["identity_conversations.jsonl", "safety_sft_conversations_multiturn_filtered.jsonl"]


def build_mixture(custom_json):
    from tasks.arc import ARC
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    candidates = [("ARC-Easy train", lambda: ARC(subset="ARC-Easy", split="train")),
                  ("ARC-Challenge train", lambda: ARC(subset="ARC-Challenge", split="train")),
                  ("GSM8K train", lambda: GSM8K(subset="main", split="train")),
                  ("SmolTalk train", lambda: SmolTalk(split="train", stop=10_000)),
                  ("SimpleSpelling", lambda: SimpleSpelling(size=300, split="train")),
                  ("SpellingBee", lambda: SpellingBee(size=300, split="train"))]
    files = [os.path.join(PROJECT_DATA, f) for f in PROJECT_CONVERSATIONS] + list(custom_json)
    candidates += [(os.path.basename(f), lambda f=f: CustomJSON(filepath=f)) for f in files if os.path.exists(f) or f in custom_json]
    train_tasks, summary = load_available(candidates)
    val_tasks, _ = load_available([("SmolTalk test", lambda: SmolTalk(split="test", stop=1000))])
    if not train_tasks:
        return None, None, summary
    return (*mixtures(train_tasks, val_tasks), summary)


def main(argv=None):
    p = argparse.ArgumentParser(description="Supervised finetuning of the chat model")
    add_finetune_flags(p, source="mid", dest="sft", lr_frac=0.02, max_seq_len=2048, device_batch_size=4, examples_per_step=32)
    p.add_argument("--custom-json", action="append", default=[], help="extra JSONL of conversations (repeatable)")
    args = p.parse_args(argv)
    check_finetune_flags(p, args)
    for f in args.custom_json:
        if not os.path.exists(f):
            p.error(f"--custom-json file not found: {f}")
    return run(args, lambda: build_mixture(args.custom_json), packed=False, section="Chat SFT",
               no_data_hint="Go online (Hugging Face hub), set NANOCHAT_DATA_DIR to a local mirror with "
                            "chat_sft/*.messages.jsonl, or pass --custom-json FILE.")


if __name__ == "__main__":
    sys.exit(main())
