"""
Train the BPE tokenizer on the pretraining shards.

    python -m scripts.tok_train --max-chars 2000000000 --doc-cap 10000 --vocab-size 65536

Writes $NANOCHAT_BASE_DIR/tokenizer/{tokenizer.pkl, token_bytes.pt} and logs "Tokenizer training".
"""

import argparse
import itertools
import os
import sys
import time

from tqdm import tqdm

from nanochat.common import get_base_dir
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, validate_vocab_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters per document")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size, special tokens included")
    args = parser.parse_args(argv)
    try:
        validate_vocab_size(args.vocab_size)
    except ValueError as e:
        parser.error(f"--vocab-size: {e}")
    if args.max_chars <= 0:
        parser.error(f"--max-chars must be > 0, got {args.max_chars}")
    if args.doc_cap <= 0:
        parser.error(f"--doc-cap must be > 0, got {args.doc_cap}")
    return args


def text_iterator(batches, max_chars, doc_cap, stats):
    """
    Documents capped at doc_cap chars, until max_chars in total; stats counts what was used. A progress bar
    follows the reading; the BPE merges are computed after the last document, which the log says.
    """
    with tqdm(total=max_chars, desc="reading text", unit="char", unit_scale=True, leave=False) as bar:
        for batch in batches:
            for doc in batch:
                doc = doc[:doc_cap]
                stats["chars"] += len(doc)
                stats["docs"] += 1
                bar.update(len(doc))
                yield doc
                if stats["chars"] >= max_chars:
                    break
            if stats["chars"] >= max_chars:
                break
    print(f"read {stats['docs']:,} documents ({stats['chars']:,} characters); computing the merges...", flush=True)


def first_batch_or_exit(batches):
    """Fail early and cleanly (no stack trace) when there are no shards, before training starts."""
    try:
        return next(batches)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except StopIteration:
        print("error: the training shards contain no documents", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    args = parse_args(argv)
    print(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}")

    batches = parquets_iter_batched(split="train")
    batches = itertools.chain([first_batch_or_exit(batches)], batches)
    stats = {"chars": 0, "docs": 0}
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(
        text_iterator(batches, args.max_chars, args.doc_cap, stats), args.vocab_size
    )
    train_time = time.time() - t0
    print(f"trained on {stats['docs']:,} documents, {stats['chars']:,} characters in {train_time:.2f}s")

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(tokenizer_dir)
    print(f"saved tokenizer to {tokenizer_dir}")

    # sanity check: decode(encode(x)) == x on text with numbers, unicode and an emoji
    sample = "Hello world! 12345 numbers, ünïcödé, 한국어, code: x = [i**2 for i in range(10)] 🚀"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample, "round trip failed"

    token_bytes = tokenizer.compute_token_bytes()
    regular = token_bytes[token_bytes > 0].float()
    print(f"token bytes: min {int(regular.min())}, max {int(regular.max())}, mean {regular.mean():.3f}")
    get_report().log("Tokenizer training", [
        vars(args),
        {"train_time_s": train_time, "train_docs": stats["docs"], "train_chars": stats["chars"]},
        {"trained_vocab_size": tokenizer.get_vocab_size(), "num_special_tokens": len(tokenizer.get_special_tokens()),
         "token_bytes_min": int(regular.min()), "token_bytes_max": int(regular.max()),
         "token_bytes_mean": regular.mean().item()},
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
