"""
Import a Hugging Face NanoChat model directory (model_type "nanochat") as a nanochat checkpoint.

python -m scripts.import_hf ./my-nanochat --model-tag d20-hf --source sft
then: python -m scripts.chat_cli -i sft -g d20-hf, chat_eval, chat_web ...

Reads config.json, tokenizer.json and safetensors weights (never pickles). The tokenizer becomes the project's
tokenizer when $NANOCHAT_BASE_DIR has none; a different one already there is refused (import into a fresh
NANOCHAT_BASE_DIR instead).
"""

import argparse
import sys

from nanochat.checkpoint_manager import SOURCES, CheckpointError
from nanochat.hf_format import HFFormatError, import_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Import a Hugging Face NanoChat model as a nanochat checkpoint")
    p.add_argument("model_dir", help="directory with config.json, tokenizer.json and model.safetensors")
    p.add_argument("--model-tag", required=True, help="tag to save the checkpoint under, e.g. d20-hf")
    p.add_argument("--source", default="sft", choices=list(SOURCES), help="which checkpoints it joins")
    p.add_argument("--force", action="store_true", help="replace existing checkpoints under this tag")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        checkpoint_dir = import_checkpoint(args.model_dir, args.source, args.model_tag, force=args.force)
    except (CheckpointError, HFFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported {args.model_dir} as {args.source} model {args.model_tag} (step 0) in {checkpoint_dir}")
    print(f"chat with it: python -m scripts.chat_cli -i {args.source} -g {args.model_tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
