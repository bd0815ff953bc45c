"""Transcripts compared as words."""

from __future__ import annotations

import re


def normalise(text: str) -> str:
    """Lower case words without punctuation, single-spaced (for comparing transcripts)."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())
