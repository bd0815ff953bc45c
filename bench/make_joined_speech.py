"""Write a long utterance without pauses: beckett.wav's six phrases joined back to back.

Short phrases finish before two interim decodes can agree on a word, so speech onset ->
first delta needs longer speech. This makes it (the same audio the streaming test uses):

    .venv/bin/python bench/make_joined_speech.py /tmp/joined-20s.wav --seconds 20
"""

from __future__ import annotations

import argparse
import sys
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.audio_file import read_audio
from tests.conftest import BECKETT
from tests.integration.test_streaming import phrases_without_pauses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="WAV file to write (16 kHz mono s16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="speech length (default 20)")
    args = parser.parse_args()
    audio = phrases_without_pauses(read_audio(BECKETT), args.seconds)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm.tobytes())
    print(f"wrote {args.out}: {len(audio) / 16000:.2f} s")


if __name__ == "__main__":
    main()
