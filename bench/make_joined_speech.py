"""Write a long utterance without pauses: beckett.wav's six phrases joined back to back.

Short phrases finish before two interim decodes can agree on a word, so speech onset ->
first delta needs longer speech. This makes it (the same audio the streaming test uses):

    .venv/bin/python bench/make_joined_speech.py /tmp/joined-20s.wav --seconds 20

It also writes what the file says beside it (``/tmp/joined-20s.txt``: the phrases in order),
which ``bench/latency.py`` and ``bench/capacity.py`` take as the reference for the word error
rate.
"""

from __future__ import annotations

import argparse
import sys
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.audio_file import read_audio
from bench.speech import BECKETT, BECKETT_PHRASES, BECKETT_REGIONS
from voxtral_rtc_client.audio import without_pauses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="WAV file to write (16 kHz mono s16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="speech length (default 20)")
    args = parser.parse_args()
    audio = without_pauses(read_audio(BECKETT), BECKETT_REGIONS, args.seconds)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm.tobytes())
    # The phrases repeat whole: the speech between the 0.5 s lead and the 1 s tail.
    cycle = sum(int(b * 16000) - int(a * 16000) for a, b in BECKETT_REGIONS)
    repeats = (len(audio) - 8000 - 16000) // cycle
    reference = args.out.with_suffix(".txt")
    reference.write_text(". ".join(BECKETT_PHRASES * repeats).capitalize() + ".\n")
    print(f"wrote {args.out}: {len(audio) / 16000:.2f} s; {reference}: {6 * repeats} phrases")


if __name__ == "__main__":
    main()
