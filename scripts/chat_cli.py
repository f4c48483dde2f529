"""
Chat with a model in the terminal.

python -m scripts.chat_cli -i sft                        interactive multi-turn chat ('clear' resets, 'quit' exits)
python -m scripts.chat_cli -i sft -p "Why is the sky blue?"   answer once and exit
python -m scripts.chat_cli -i base -p "The capital of France is"   base models: plain completion
python -m scripts.chat_cli -i sft --speculative-proposals 4 --draft-model-tag d4      speculative decoding
python -m scripts.chat_cli -i sft --speculative-proposals 4 --draft-model-tag ngram   n-gram drafts
python -m scripts.chat_cli -i base -p "The river" -t 0 --dtype float32   compute in fp32 on a GPU too
"""

import argparse
import sys

import torch

from nanochat.checkpoint_manager import SOURCES, CheckpointError, load_draft, load_model, speculative_flags_error
from nanochat.common import DEVICE_TYPES, DTYPE_CHOICES, autocast_context, compute_init
from nanochat.engine import Engine
from nanochat.sampling import validate_sampling_params
from nanochat.serving.streaming import TextStream


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    p.add_argument("-i", "--source", default="sft", choices=list(SOURCES), help="which checkpoints: base|mid|sft|rl")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("-p", "--prompt", default=None, help="answer this once and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("-m", "--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--speculative-proposals", type=int, default=0, help="draft tokens per target forward (0 = off)")
    p.add_argument("--draft-model-tag", default=None, help="a smaller model of the same source, or 'ngram'")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype (bf16: autocast, matmul weights loaded in bf16). auto: bf16 on GPUs with native "
                        "bf16, else fp32")
    args = p.parse_args(argv)
    try:
        validate_sampling_params(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        p.error(str(e))
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if error := speculative_flags_error(args.speculative_proposals, args.draft_model_tag):
        p.error(error)
    return args


def reply(engine, prompt_tokens, args, autocast):
    """Stream one reply; returns its tokens (the terminal token excluded)."""
    tokenizer = engine.tokenizer
    terminal = tokenizer.terminal_token_ids()
    stream, tokens = TextStream(tokenizer), []  # holds back an incomplete UTF-8 character until it is whole
    max_tokens = min(args.max_tokens, engine.context_len - len(prompt_tokens))
    sampling = dict(max_tokens=max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    with autocast:
        if args.speculative_proposals:
            steps = engine.speculative(prompt_tokens, speculative_num_tokens=args.speculative_proposals, **sampling)
        else:
            steps = engine.generate(prompt_tokens, **sampling)
        for column, _ in steps:
            if column[0] in terminal:
                break
            tokens.append(column[0])
            print(stream.add(column[0])[0], end="", flush=True)
    print(stream.finish())
    if args.speculative_proposals:
        s = steps.stats
        print(f"[speculative: {s['accepted']}/{s['drafted']} drafts accepted, "
              f"{s['tokens_per_target_forward']:.2f} tokens per target forward]")
    return tokens


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)  # None: the device's inference policy
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step,
                                            compute_dtype=dtype)
        draft = load_draft(args.source, args.draft_model_tag, device, compute_dtype=dtype)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    autocast = autocast_context(device.type, dtype)
    engine = Engine(model, tokenizer, draft=draft)
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    is_base = args.source == "base"

    if args.prompt is None:
        print(f"nanochat {args.source} model (step {meta['step']}). Type 'clear' to start over, 'quit' to exit.")
    conversation = [bos]
    while True:
        if args.prompt is not None:
            message = args.prompt
        else:
            try:
                message = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if message.lower() in ("quit", "exit"):
                return 0
            if message.lower() == "clear":
                conversation = [bos]
                print("(conversation cleared)")
                continue
            if not message:
                continue
        if is_base:  # no chat template: continue the text
            prompt = [bos] + tokenizer.encode(message)
        else:
            prompt = conversation + [user_start, *tokenizer.encode(message), user_end, assistant_start]
        if len(prompt) >= engine.context_len:
            print(f"(the conversation has {len(prompt)} tokens, the model's context is {engine.context_len}: "
                  f"type 'clear' to start over)")
            if args.prompt is not None:
                return 1
            continue
        if not is_base:
            print("\nAssistant: ", end="", flush=True)
        try:
            answer = reply(engine, prompt, args, autocast)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if args.prompt is not None:
            return 0
        if not is_base:
            conversation = prompt + answer + [assistant_end]


if __name__ == "__main__":
    sys.exit(main())
