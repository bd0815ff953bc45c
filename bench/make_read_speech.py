"""Write read speech made by espeak-ng: sentences of 2-6 s with pauses, or joined into long
utterances, and what they say beside it (``.txt``, the reference of ``bench/latency.py``).

beckett.wav's phrases are under a second; the embedded engine's cost grows with the
utterance, so its benchmarks also need ordinary sentences and long turns. No recording can be
downloaded here, so the speech is synthetic (Debian's ``espeak-ng``, 165 words a minute, US
English unless ``--voices`` names others, each of which then reads them all in turn),
normalised to half of full scale:

    .venv/bin/python bench/make_read_speech.py /tmp/read-60s.wav --sentences 12
    .venv/bin/python bench/make_read_speech.py /tmp/read-long.wav --per-utterance 4
    .venv/bin/python bench/make_read_speech.py /tmp/read-8min.wav --voices en-us en-gb en-us+f3
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.audio_file import read_audio

RATE = 16_000
SENTENCES = (
    "The morning train left the station a few minutes late, "
    "and most of the passengers did not seem to mind.",
    "A small dog was sleeping under the bench near the ticket office.",
    "She opened the window and listened to the rain falling on the roof of the old barn.",
    "We should check the weather report before we drive across the mountains tomorrow.",
    "The meeting has been moved to Thursday afternoon because the manager is traveling.",
    "Please remember to bring your passport, your tickets, and a warm jacket.",
    "He counted the coins twice and found that he was still three dollars short.",
    "The library closes at nine o'clock on weekdays and at five on Saturdays.",
    "Fresh bread and strong coffee are the best way to start a cold winter day.",
    "Our team finished the project two weeks ahead of schedule.",
    "The children built a castle of sand and watched the waves wash it away.",
    "If you turn left at the bridge, you will see the museum on your right.",
    "The doctor said that the patient was recovering well and could go home soon.",
    "Thousands of birds fly south every autumn to escape the cold northern winter.",
    "I forgot my umbrella at the restaurant, so I walked home in the rain.",
    "The engineers tested the new engine for several hours without a single failure.",
    "My grandmother kept a garden full of tomatoes, beans, and yellow flowers.",
    "The price of oil rose sharply after the storm damaged several refineries.",
    "Could you please send me the report by the end of the day?",
    "The river was so clear that we could see the fish swimming near the bottom.",
    "After dinner, we played cards and talked about our plans for the summer.",
    "The pilot announced that the plane would land twenty minutes early.",
    "A good teacher can make even the most difficult subject seem simple.",
    "The city council voted to build a new park near the harbor.",
    "Every evening the old man walked along the beach with his two dogs.",
    "The software update fixed the problem with the battery draining too quickly.",
    "We watched the sun set behind the hills and then drove back to the hotel.",
    "The kitchen smelled of garlic, onions, and freshly baked apple pie.",
    "Most of the students passed the exam, but a few will need to take it again.",
    "The museum has a large collection of paintings from the nineteenth century.",
)


def speak(text: str, voice: str, folder: Path) -> np.ndarray:
    path = folder / "sentence.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "165", "-w", str(path), text], check=True)
    audio = read_audio(path)
    return (audio / max(1e-6, float(np.abs(audio).max())) * 0.5).astype(np.float32)


def without_trailing_silence(audio: np.ndarray) -> np.ndarray:
    """``audio`` up to its last sample above -60 dBFS."""
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    return audio[: loud[-1] + 1] if len(loud) else audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="WAV file to write (16 kHz mono s16)")
    parser.add_argument("--sentences", type=int, default=len(SENTENCES), help="how many (max 30)")
    parser.add_argument("--pause-s", type=float, default=1.2, help="silence between utterances")
    parser.add_argument(
        "--per-utterance",
        type=int,
        default=1,
        help="sentences spoken without a pause between them (0.15 s gap): long utterances",
    )
    parser.add_argument(
        "--voices",
        nargs="+",
        default=["en-us"],
        help="espeak-ng voices (espeak-ng --voices=en); each reads the sentences once",
    )
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("needs espeak-ng (apt-get install espeak-ng)")
    chosen = SENTENCES[: max(1, min(args.sentences, len(SENTENCES)))]
    read = [(voice, text) for voice in args.voices for text in chosen]
    pause = np.zeros(int(args.pause_s * RATE), np.float32)
    gap = np.zeros(int(0.15 * RATE), np.float32)
    parts = [np.zeros(RATE // 2, np.float32)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (voice, text) in enumerate(read):
            spoken = speak(text, voice, Path(tmp))
            last_of_turn = (i + 1) % args.per_utterance == 0 or i + 1 == len(read)
            # espeak-ng ends each sentence with about 0.3 s of silence: inside a turn it
            # goes, or the gap would be long enough for a VAD to cut the turn there.
            parts.append(spoken if last_of_turn else without_trailing_silence(spoken))
            parts.append(pause if last_of_turn else gap)
    audio = np.concatenate(parts)
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    reference = args.out.with_suffix(".txt")
    reference.write_text(" ".join(text for _, text in read) + "\n")
    turns = -(-len(read) // args.per_utterance)
    print(f"wrote {args.out}: {len(audio) / RATE:.1f} s, {turns} utterances; {reference}")


if __name__ == "__main__":
    main()
