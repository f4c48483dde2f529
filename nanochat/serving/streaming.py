"""
Token ids -> text pieces for a streamed reply, with OpenAI's stop sequences.

Byte-level BPE tokens can end inside a multi-byte UTF-8 character, so undecodable tails wait for the
next token. Text that might be the beginning of a stop sequence is held back too: if the stop sequence
completes, neither it nor anything after it is sent; if not, the held text goes out with the next piece.
Work per token is independent of the reply length: each token is decoded once, and each search only
looks at the new text and the last (longest stop - 1) characters; the server bounds stop lengths.
"""


class TextStream:
    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.undecoded = []  # tokens whose text is not complete yet
        self.text = ""  # decoded reply so far
        self.sent = 0  # characters of self.text already returned
        self.searched = 0  # stop sequences cannot start before this index
        self.num_tokens = 0
        self.stopped = False
        # when the request asked for logprobs: (token, logprob, [(id, logprob)]) per token fed, and the
        # prompt's [(token, None, None), (token, logprob, top), ...] (the scheduler's logprob events; the app formats them)
        self.logprobs, self.prompt_logprobs = [], None

    def add(self, token):
        """Feed one token; returns (piece of text to send now, whether a stop sequence matched)."""
        self.num_tokens += 1
        self.undecoded.append(token)
        decoded = self.tokenizer.decode(self.undecoded)
        if decoded.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return "", False
        self.undecoded = []
        self.text += decoded
        return self._advance(final=False)

    def finish(self):
        """The reply ended: the rest of the text (incomplete bytes decoded with replacement characters)."""
        if self.undecoded:
            self.text += self.tokenizer.decode(self.undecoded)
            self.undecoded = []
        return self._advance(final=True)[0]

    def _advance(self, final):
        if self.stopped:
            return "", True
        if self.stop:
            hits = [i for i in (self.text.find(s, self.searched) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                piece, self.sent = self.text[self.sent:end], end
                return piece, True
            self.searched = max(self.searched, len(self.text) - self.longest_stop + 1)
        safe = len(self.text) if final else len(self.text) - self._held_back()
        piece = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece, False

    def _held_back(self):
        """
        Length of the longest end of the text that is a proper prefix of some stop sequence: only the last
        longest_stop - 1 characters are looked at, and only where a stop's first character occurs.
        """
        tail = self.text[max(0, len(self.text) - self.longest_stop + 1):] if self.longest_stop > 1 else ""
        held = 0
        for stop in self.stop:
            i = tail.find(stop[0])
            while 0 <= i and len(tail) - i > held:
                if stop.startswith(tail[i:]):
                    held = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
        return held
