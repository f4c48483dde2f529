"""
The Python half of dev/gpu_check.sh: writes its data, and reads each step's log into a one-line verdict
(printed) and an exit status (0 = pass).

    python dev/gpu_check_verdicts.py data WORK_DIR          a synthetic corpus + a small chat dataset mirror
    python dev/gpu_check_verdicts.py VERDICT LOG [ARGS...]  one of the verdicts below
"""

import json
import os
import random
import re
import sys

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d |^\[speculative")  # logger lines and speculative statistics
PEAK = re.compile(r"peak memory allocated: ([0-9.]+) GB \(estimated ([0-9.]+) GB, ratio ([0-9.]+)\)")


def write_data(work):
    rng = random.Random(0)
    words = ("the a one river stone light city garden teacher child friend house road story music paper window "
             "morning night summer winter water fire small large quiet bright old new green blue walks sings reads "
             "writes builds finds keeps opens carries follows remembers tells and but while because after before").split()
    with open(os.path.join(work, "corpus.txt"), "w") as f:
        for _ in range(20000):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
                         for _ in range(rng.randint(2, 8))]
            f.write(" ".join(sentences) + "\n\n")

    def jsonl(path, rows):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    gsm8k = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
              "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
             for i in range(200)]
    jsonl(f"{work}/mirror/gsm8k/train.jsonl", gsm8k)
    jsonl(f"{work}/mirror/gsm8k/test.jsonl", gsm8k[:64])
    jsonl(f"{work}/mirror/chat_sft/tiny.messages.jsonl",
          [{"messages": [{"role": "user", "content": f"Say something about the number {i}."},
                         {"role": "assistant", "content": f"The number {i} comes after {i - 1}."}]} for i in range(1, 400)])
    jsonl(f"{work}/mirror/arc/arc_easy_test.jsonl",
          [{"query": f"Question: Which number is largest, option {i}?\nAnswer:", "choices": ["1", "2", "3", "40"],
            "gold": 3} for i in range(64)])


def peak(log, required):
    """The first peak-memory line: '' where there is none and none is required (CPU)."""
    m = PEAK.search(log)
    if m is None and required:
        raise AssertionError("no 'peak memory allocated' line")
    return f"peak {m.group(1)} GB, estimated {m.group(2)} GB (ratio {m.group(3)})" if m else ""


def losses(path):
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def last_json(log):
    """The client's result: the last line that is a JSON object (the server's shutdown lines come after it)."""
    lines = [line for line in log.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError("no JSON result line")
    return json.loads(lines[-1])


def verdict(name, log, args, on_gpu):
    if name == "base_train":
        assert "step 00030" in log, "did not reach step 30"
        mfu = re.findall(r"mfu (\S+)", log)[-1]
        return f"mfu {mfu}; {peak(log, on_gpu)}"
    if name == "resume":  # bf16 kernels are not bitwise deterministic: agree to 1e-3 relative
        full, resumed = losses(args[0]), losses(args[1])
        assert sorted(resumed) == list(range(16, 31)), sorted(resumed)
        diff = max(abs(full[s] - resumed[s]) / abs(full[s]) for s in resumed)
        assert diff < 1e-3, f"losses differ by {diff:.2e}"
        return f"steps 16-30 match the uninterrupted run, max relative difference {diff:.2e}"
    if name == "memory":  # the estimate must cover the real peak, without planning twice the memory
        if not on_gpu:
            return "no CUDA allocator on CPU"
        text = peak(log, True)
        ratio = float(PEAK.search(log).group(3))
        assert 1.0 <= ratio <= 1.6, f"{text}: outside [1.0, 1.6]"
        return text
    if name == "no_recompile":
        after = log[log.index("step 00001/"):]
        n = after.count("Recompiling")
        assert n == 0, f"{n} recompilations after step 1"
        return f"no recompilation after step 1; {peak(log, on_gpu)}"
    if name == "reply":
        # splitlines also splits at a progress bar's carriage returns; the bars themselves ("...%|") are skipped
        text = " ".join(line for line in log.splitlines() if not LOG_LINE.match(line) and "%|" not in line)
        return " ".join(text.split())[:80]
    if name == "same_reply":  # greedy speculative output equals plain greedy output
        reply = lambda text: [line for line in text.splitlines() if not LOG_LINE.match(line)]
        with open(args[0]) as f:
            assert reply(log) == reply(f.read()), "differs from plain greedy decoding"
        return re.search(r"speculative: [^\]]*", log).group(0)
    if name == "web":
        result = last_json(log)
        assert result["ok"] == result["of"], f"{result['of'] - result['ok']} of {result['of']} requests failed"
        return f"{result['ok']}/{result['of']} requests in {result['seconds']} s on {result['replicas']} replica(s)"
    if name == "web_speculative":
        result = last_json(log)
        with open(args[0]) as f:
            batched = last_json(f.read())
        assert result["ok"] == 1 and result["drafted"] > 0, result
        return (f"drafted {result['drafted']:.0f} tokens; same text as in the 32-client batch (bf16 may differ in "
                f"the last bits): {result['first'] == batched['first']}")
    raise SystemExit(f"unknown verdict {name!r}")


def main():
    if sys.argv[1] == "data":
        write_data(sys.argv[2])
        return 0
    name, log_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(log_path) as f:
        log = f.read()
    try:
        print(verdict(name, log, args, on_gpu=os.environ.get("DEVICE") == "cuda"))
    except (AssertionError, ValueError, IndexError, KeyError, AttributeError) as e:
        print(f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
