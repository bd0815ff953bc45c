"""LocalAgreement-2: turn a series of growing hypotheses into append-only text.

While an utterance is open its audio is re-transcribed every few hundred ms; each hypothesis
may rewrite its tail. A word is committed (sent as a ``delta``) only once two consecutive
hypotheses agree on it and on everything before it, as in whisper_streaming. Committed words
are never taken back; the final transcript stays authoritative.
"""

from __future__ import annotations

import re

_WORD_KEY = re.compile(r"[^\w']+")


def _key(word: str) -> str:
    """Compare words without case or punctuation: 'tried.' agrees with 'Tried'."""
    return _WORD_KEY.sub("", word.lower())


class LocalAgreement:
    def __init__(self) -> None:
        self._previous: list[str] = []
        self.committed: list[str] = []

    @property
    def text(self) -> str:
        return " ".join(self.committed)

    def update(self, hypothesis: str) -> str:
        """Feed the newest hypothesis; return the newly committed text ('' if none)."""
        words = hypothesis.split()
        agreed = 0
        for a, b in zip(self._previous, words, strict=False):
            if _key(a) != _key(b):
                break
            agreed += 1
        self._previous = words
        return self._commit_up_to(words, agreed)

    def finish(self, final: str) -> str:
        """The rest of ``final`` after the committed words, if it extends them; else ''.

        When the final text contradicts committed words nothing is sent: deltas cannot be
        retracted, and the ``completed`` event carries the authoritative text anyway.
        """
        words = final.split()
        return self._commit_up_to(words, len(words))

    def _commit_up_to(self, words: list[str], agreed: int) -> str:
        n = len(self.committed)
        if agreed <= n:
            return ""
        if [_key(w) for w in words[:n]] != [_key(w) for w in self.committed]:
            return ""  # the hypothesis rewrote committed words: wait for agreement past them
        new = words[n:agreed]
        self.committed.extend(new)
        text = " ".join(new)
        return text if n == 0 else " " + text
