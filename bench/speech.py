"""The benchmarks' test speech: ``tests/data/beckett.wav`` and what it says (read from
``tests/data/beckett.json``, the facts the tests use too)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
BECKETT = DATA / "beckett.wav"
_FACTS = json.loads((DATA / "beckett.json").read_text())
#: The six phrases in order, normalised (``voxtral_rtc_client.normalise``).
BECKETT_PHRASES: list[str] = _FACTS["phrases"]
#: Silero speech regions in seconds.
BECKETT_REGIONS: list[tuple[float, float]] = [(a, b) for a, b in _FACTS["regions"]]
