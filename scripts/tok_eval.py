"""
Compression of our tokenizer vs GPT-2 and GPT-4 (bytes per token: higher = fewer tokens per text).

    python -m scripts.tok_eval

GPT-2/GPT-4 vocabularies are downloaded by tiktoken on first use; offline we report our numbers only.
"""

import os
import sys

import tiktoken

from nanochat.common import get_data_dir
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

SAMPLE_CHARS = 10_000  # characters taken from data files / held-out docs (keeps the eval quick)

NEWS_TEXT = """The city council voted on Tuesday to approve a new budget that expands bus service to the \
northern suburbs and delays the planned repairs to the old harbor bridge. Officials said the cost of \
steel had risen by nearly 18 percent since March, forcing the delay. Residents who spoke at the meeting \
were divided: some welcomed the longer bus hours, while others warned that the bridge, built in 1962, \
could not wait another two years. A final vote on the bridge contract is expected in early October."""

KOREAN_TEXT = """오늘 아침에는 비가 많이 내려서 버스를 타고 학교에 갔습니다. 도서관에서 친구를 만나 함께 \
수학 숙제를 했고, 점심으로는 김치찌개를 먹었습니다. 내일은 날씨가 맑을 것이라고 하니 공원에서 \
자전거를 탈 계획입니다."""

CODE_TEXT = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


if __name__ == "__main__":
    print(moving_average([1, 2, 3, 4, 5, 6], 3))  # [2.0, 3.0, 4.0, 5.0]
'''

MATH_TEXT = r"""\begin{theorem}
For every integer $n \geq 1$, $\sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}$.
\end{theorem}
\begin{proof}
For $n = 1$ both sides equal $1$. Assume the identity for $n$; then
\[ \sum_{k=1}^{n+1} k^2 = \frac{n(n+1)(2n+1)}{6} + (n+1)^2 = \frac{(n+1)(n+2)(2n+3)}{6}, \]
which is the claim for $n+1$. By induction the theorem holds for all $n$.
\end{proof}"""

SCIENCE_TEXT = """Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent \
reactions, chlorophyll absorbs photons and the energy splits water molecules, releasing oxygen as a \
by-product. The resulting ATP and NADPH then drive the Calvin cycle, in which the enzyme RuBisCO fixes \
carbon dioxide into three-carbon molecules. Because RuBisCO also reacts with oxygen, some plants have \
evolved C4 and CAM pathways that concentrate CO2 around the enzyme and reduce wasteful photorespiration."""


def held_out_sample():
    """The first validation document(s) of the pretraining shards (text our tokenizer never saw), or None."""
    try:
        docs = next(parquets_iter_batched(split="val"))
    except (FileNotFoundError, StopIteration) as e:
        print(f"note: no validation shard, skipping the held-out sample ({e})")
        return None
    text = ""
    for doc in docs:
        if len(text) >= SAMPLE_CHARS:
            break
        text += doc + "\n"
    return text[:SAMPLE_CHARS] or None


def data_dir_samples():
    """A sample of each text file in $NANOCHAT_DATA_DIR we know about (when the mirror is there)."""
    data_dir = get_data_dir()
    samples = {}
    for name, rel_path in (("shakespeare", "tinyshakespeare/input.txt"),
                           ("tinystories", "tinystories/tinystories_val_sample.txt")):
        path = os.path.join(data_dir, rel_path) if data_dir else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                samples[name] = f.read(SAMPLE_CHARS)
    return samples


def load_reference_encodings():
    """GPT-2 and GPT-4 encodings; tiktoken downloads them, so offline we return what we can get."""
    refs = {}
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            refs[label] = tiktoken.get_encoding(name)
        except Exception as e:  # network errors come in many types (requests, urllib, ssl, ...)
            print(f"note: could not load tiktoken {name!r} ({type(e).__name__}); reporting our tokenizer only")
    return refs


def main():
    try:
        tokenizer = get_tokenizer()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    texts = {"news": NEWS_TEXT, "korean": KOREAN_TEXT, "code": CODE_TEXT, "math": MATH_TEXT, "science": SCIENCE_TEXT}
    held_out = held_out_sample()
    if held_out:
        texts["held-out"] = held_out
    texts.update(data_dir_samples())

    encoders = {"ours": tokenizer.encode}
    encoders.update({label: enc.encode_ordinary for label, enc in load_reference_encodings().items()})

    columns = "".join(f" {label + ' tok':>10} {label + ' B/tok':>11}" for label in encoders)
    print(f"{'text':<12} {'bytes':>7}{columns}")
    rows = []
    for name, text in texts.items():
        num_bytes = len(text.encode("utf-8"))
        row = {"text": name, "bytes": num_bytes}
        cells = ""
        for label, encode in encoders.items():
            ids = encode(text)
            assert label != "ours" or tokenizer.decode(ids) == text, f"round trip failed on {name}"
            row[f"{label}_tokens"] = len(ids)
            row[f"{label}_bytes_per_token"] = num_bytes / len(ids)
            cells += f" {len(ids):>10} {num_bytes / len(ids):>11.3f}"
        print(f"{name:<12} {num_bytes:>7}{cells}")
        rows.append(row)

    report_lines = [f"vocab_size: {tokenizer.get_vocab_size():,}", "", "bytes per token:", ""]
    for row in rows:
        ratios = ", ".join(f"{label} {row[label + '_bytes_per_token']:.3f}" for label in encoders)
        report_lines.append(f"- {row['text']} ({row['bytes']:,} bytes): {ratios}")
    get_report().log("Tokenizer evaluation", report_lines)


if __name__ == "__main__":
    main()
