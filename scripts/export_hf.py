"""
Export a checkpoint to the Hugging Face NanoChat format (transformers, vLLM, the hub).

python -m scripts.export_hf -i sft --out ./my-nanochat                 newest step of the largest sft model
python -m scripts.export_hf -i base -g d4 -s 300 --out DIR --dtype float32

Writes config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json
(with the chat template). Loads with transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR).
"""

import argparse
import sys

from nanochat.checkpoint_manager import SOURCES, CheckpointError
from nanochat.hf_format import EXPORT_DTYPES, HFFormatError, export_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a nanochat checkpoint to the Hugging Face NanoChat format")
    p.add_argument("-i", "--source", default="sft", choices=list(SOURCES), help="which checkpoints: base|mid|sft|rl")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent, unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=list(EXPORT_DTYPES), help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace the contents of an existing --out directory")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        model_tag, step = export_checkpoint(args.source, args.out, model_tag=args.model_tag, step=args.step,
                                            dtype=args.dtype, force=args.force)
    except (CheckpointError, HFFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.source} model {model_tag} step {step} ({args.dtype}) to {args.out}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r}), or `vllm serve {args.out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
