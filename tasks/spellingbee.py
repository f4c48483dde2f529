"""
Synthetic spelling tasks. Tokens hide letters from the model ("strawberry" is one or two tokens), so
questions like "How many 'r' are in 'strawberry'?" need to be taught explicitly:
  - SpellingBee: count a letter in a word. The reference answer spells the word with a running count,
    checks it with the calculator tool ('strawberry'.count('r')), then gives "#### <count>".
  - SimpleSpelling: spell a word, "apple" -> "apple:a,p,p,l,e".
Both are generative and endless: example i of a split is made from its own seeded RNG, so it is the same
on every run and machine (given the same word list). Words are split ~90/10 between train and test by a
hash of the word, so test words are never trained on.

Word list, first that works: the cached copy in $NANOCHAT_BASE_DIR/task_data/; a download of
WORD_LIST_URL (dwyl/english-words, ~370k words, Unlicense); words that occur at least twice in the text
files of NANOCHAT_DATA_DIR (offline); a small built-in list (last resort). None of these is curated: a
general English list contains rare, archaic and offensive words too.
"""

import glob
import os
import random
import re
import zlib

from nanochat.common import get_base_dir, get_data_dir, logger
from tasks.common import Task
from tasks.gsm8k import extract_answer

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
WORD_LIST_FILE = "words_alpha.txt"
MIN_LEN, MAX_LEN = 3, 14  # letters per word: long enough to be interesting, short enough to spell
TEXT_BUDGET_BYTES = 4_000_000  # how much mirror text to scan for words (about a second)
TEST_PERCENT = 10
ALPHABET = "abcdefghijklmnopqrstuvwxyz"

BUILTIN_WORDS = """
strawberry banana apple orange grape lemon cherry peach mango melon pineapple raspberry blueberry coconut
apricot avocado tomato potato carrot onion garlic pepper cabbage lettuce spinach pumpkin cucumber broccoli
mississippi tennessee california massachusetts connecticut alabama minnesota
elephant giraffe kangaroo dolphin penguin octopus squirrel rabbit turtle zebra monkey tiger lion leopard
butterfly caterpillar mosquito grasshopper dragonfly ladybug scorpion spider beetle hummingbird
computer keyboard monitor printer internet software hardware algorithm program function variable
language grammar sentence paragraph vocabulary dictionary alphabet spelling letter syllable
necessary separate definitely occasionally accommodate embarrass rhythm committee questionnaire
possession successful recommend millennium conscientious bureaucracy entrepreneur
chocolate vanilla caramel cinnamon sugar butter cookie biscuit pancake waffle sandwich spaghetti
mountain river valley desert forest island ocean volcano glacier canyon meadow waterfall
umbrella bicycle airplane helicopter submarine elevator escalator refrigerator telephone television
happiness kindness patience courage wisdom honesty freedom friendship knowledge curiosity
teacher student doctor engineer scientist musician painter farmer carpenter plumber
january february september november wednesday saturday tomorrow yesterday afternoon midnight
beautiful wonderful terrible horrible excellent brilliant fantastic ordinary peculiar mysterious
balloon coffee bookkeeper committee address assessment tattoo bubble puzzle pizza jazz buzz
hippopotamus rhinoceros crocodile alligator chimpanzee orangutan flamingo pelican ostrich peacock
mathematics geometry calculus statistics probability equation fraction decimal percentage triangle
""".split()

USER_TEMPLATES = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter} in {word}.",
    "In the word {word}, how many {letter} are there?",
    "How often does {letter} occur in {word}?",
    "Can you count how many {letter} the word {word} has?",
    "what is the count of letter {letter} in {word}",
]
QUOTES = ["'{}'", '"{}"', "{}"]


# ---------------------------------------------------------------------------------------------------
# The word list

_WORDS_CACHE = {}  # (base_dir, data_dir) -> words
_DOWNLOAD_FAILED = []  # non-empty after a failed download: offline processes try only once


def clean_words(words):
    """Sorted unique lowercase a-z words of MIN_LEN..MAX_LEN letters."""
    pattern = re.compile(rf"^[a-z]{{{MIN_LEN},{MAX_LEN}}}$")
    return sorted({w.strip().lower() for w in words if pattern.match(w.strip().lower())})


def download_word_list(path, timeout=10):
    """Fetch WORD_LIST_URL to path (temp file + rename, so a partial download is never used)."""
    import requests
    response = requests.get(WORD_LIST_URL, timeout=timeout)
    response.raise_for_status()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(response.text)
    os.replace(path + ".tmp", path)


def words_from_data_dir(data_dir):
    """
    Words seen at least twice (fewer typos and OCR debris) in the mirror's text. Children's stories and
    Shakespeare come first: plain, everyday vocabulary; any other .txt only when those are absent.
    """
    paths = sorted(glob.glob(os.path.join(data_dir, "tinystories", "*.txt")))
    paths += sorted(glob.glob(os.path.join(data_dir, "tinyshakespeare", "*.txt")))
    paths = paths or sorted(glob.glob(os.path.join(data_dir, "**", "*.txt"), recursive=True))
    counts, budget = {}, TEXT_BUDGET_BYTES
    for path in paths:
        if budget <= 0:
            break
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = f.read(budget)
        budget -= len(text)
        for word in re.findall(r"[A-Za-z]+", text):
            word = word.lower()
            counts[word] = counts.get(word, 0) + 1
    return clean_words(w for w, c in counts.items() if c >= 2)


def load_words():
    """The word list (see the module docstring for the order of sources)."""
    base_dir, data_dir = get_base_dir(), get_data_dir()
    if (base_dir, data_dir) in _WORDS_CACHE:
        return _WORDS_CACHE[(base_dir, data_dir)]
    path = os.path.join(base_dir, "task_data", WORD_LIST_FILE)
    words = []
    try:
        if not os.path.exists(path) and not _DOWNLOAD_FAILED:
            download_word_list(path)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                words = clean_words(f)
    except Exception as e:  # offline, or a broken file: fall back, and say so once
        _DOWNLOAD_FAILED.append(e)
        logger.warning(f"spelling tasks: could not get the word list ({type(e).__name__}: {e}); "
                       f"using words from NANOCHAT_DATA_DIR text or the built-in list")
    if len(words) < 100 and data_dir:
        words = words_from_data_dir(data_dir)
    if len(words) < 100:
        words = clean_words(BUILTIN_WORDS)
    _WORDS_CACHE[(base_dir, data_dir)] = words
    return words


def split_words(words, split):
    """The split's share of the words: ~TEST_PERCENT% for test, chosen by a hash of the word."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train|test, got {split!r}")
    return [w for w in words if (zlib.crc32(w.encode()) % 100 < TEST_PERCENT) == (split == "test")]


# ---------------------------------------------------------------------------------------------------
# Letter counting


def count_answer_parts(word, letter):
    """The reference reply: spell with a running count, check with the tool, state the answer."""
    count, spelled = 0, []
    for ch in word:
        if ch == letter:
            count += 1
            spelled.append(f"{ch} ({count})")
        else:
            spelled.append(ch)
    found = f"I count {count}." if count else f"There is no '{letter}' in it, so the count is 0."
    verb = "is" if count == 1 else "are"
    return [
        {"type": "text", "text": f"Let me spell '{word}' and count each '{letter}' as I go:\n"
                                 f"{', '.join(spelled)}\n\n{found} Let me double-check with Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython agrees: there {verb} {count} '{letter}' in '{word}'.\n\n#### {count}"},
    ]


class WordTask(Task):
    """size synthetic examples over this split's words; example i is a pure function of (split, i)."""
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        self.size, self.split = size, split
        self.words = split_words(load_words(), split)

    def num_examples(self):
        return self.size


class SpellingBee(WordTask):

    def get_example(self, index):
        rng = random.Random(f"spellingbee-{self.split}-{index}")  # str seeds hash stably across runs
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)  # 10%: often absent
        quote = rng.choice(QUOTES)
        shown_letter = letter.upper() if rng.random() < 0.1 else letter
        user = rng.choice(USER_TEMPLATES).format(letter=quote.format(shown_letter), word=quote.format(word))
        return {
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": count_answer_parts(word, letter)}],
            "word": word, "letter": letter, "answer": word.count(letter),
        }

    def evaluate(self, conversation, assistant_response):
        """The reply's stated answer ("#### N", as the training replies end) must be the count; a number
        anywhere else (the calculator's output, a spelled-out tally) is not an answer."""
        return int(extract_answer(assistant_response) == str(conversation["answer"]))


# ---------------------------------------------------------------------------------------------------
# Spelling


class SimpleSpelling(WordTask):

    def get_example(self, index):
        rng = random.Random(f"simplespelling-{self.split}-{index}")
        word = rng.choice(self.words)
        return {
            "messages": [{"role": "user", "content": f"Spell the word: {word}"},
                         {"role": "assistant", "content": f"{word}:{','.join(word)}"}],
            "word": word,
        }

    def evaluate(self, conversation, assistant_response):
        """The letters after the last ':' (commas/spaces ignored) must spell the word."""
        spelled = assistant_response.rsplit(":", 1)[-1]
        return int(re.sub(r"[\s,]", "", spelled).lower() == conversation["word"])
