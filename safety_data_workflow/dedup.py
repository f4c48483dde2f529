"""
Exact and near-duplicate detection for short texts.

Exact: the same text after lowercasing, dropping punctuation and collapsing whitespace.
Near: Jaccard similarity of character 5-gram sets >= threshold. All pairs are compared (O(n^2) set
operations), which is fine for the ~1000 questions of a run; candidates are pre-filtered by length,
since two sets whose sizes differ by more than the threshold allows cannot be similar enough.
"""

import re

SHINGLE = 5


def normalize(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text):
    text = normalize(text)
    return {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}


def jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 1.0


def find_duplicates(texts, threshold):
    """Indices to drop, as {index: (kind, index of the kept text it duplicates)}; the first occurrence wins."""
    dropped, kept, seen = {}, [], {}
    for i, text in enumerate(texts):
        key = normalize(text)
        if key in seen:
            dropped[i] = ("exact", seen[key])
            continue
        grams = shingles(text)
        for j, other in kept:
            if min(len(grams), len(other)) >= threshold * max(len(grams), len(other)) and \
                    jaccard(grams, other) >= threshold:
                dropped[i] = ("near", j)
                break
        else:
            seen[key] = i
            kept.append((i, grams))
    return dropped
