"""Render the AV-Digits speech stems with espeak-ng, once; the result is committed.

    apt-get install -y espeak-ng
    python data/avdigits/make_stems.py            # writes data/avdigits/voices/*.ogg, stems.json

Every voice is an espeak-ng accent with a voice variant ("en-gb+m3"). Each voice speaks the ten
digit words at three speeds and a few unrelated words (the babble distractors of the
generator) at its middle speed, all at one pitch drawn per voice. Each utterance is resampled
from espeak's 22,050 Hz to 16 kHz, trimmed of leading and trailing silence and
peak-normalised; a voice's utterances are concatenated, with short gaps, into one OGG/Vorbis
file, and `stems.json` gives each one's sample range in that file.

The generator (tgdp_core/avdigits.py) holds out every fifth variant (index % 5 == 4 in the
sorted VARIANTS) for the test split; the split is its business, not this script's.

Output is deterministic for one espeak-ng build (1.51 here): the speeds and pitches come from a
fixed-seed generator and the encoder settings are fixed, so the decoded samples and stems.json
repeat exactly; the OGG bytes differ between runs only in the random stream serial numbers
libsndfile picks.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050  # espeak-ng's native output rate
SEED = 0

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
# 32 espeak-ng voice variants (voices/!v), a number set by the size budget (a few MB of stems).
# Left out: effects (Demonic, UniRobot, robosoft*) and numbered near-duplicates (iven2-4,
# klatt5-6, steph2-3, ...).
VARIANTS = tuple(sorted((
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie", "Alex", "Gene", "Lee", "Michael",
    "adam", "aunty", "belinda", "boris", "caleb", "grandma", "linda", "steph", "whisper",
)))
ACCENTS_PER_VARIANT = 2  # each variant is spoken with two accents: 64 voices in all
# Speeds relative to the voice's own base: slow, base, fast. The spread lets the generator's
# speech-share knob pick utterance durations (about 0.25 s to 0.7 s per digit).
SPEED_FACTORS = (0.7, 1.0, 1.45)
BASE_SPEED_RANGE = (150, 195)  # espeak -s, words per minute (espeak's default is 175)
PITCH_RANGE = (20, 80)  # espeak -p, 0..99 (default 50)
# Babble for the audio distractors: no digit words, nothing that sounds like one (won, to, for,
# ate, forest).
WORDS = (
    "apple", "river", "purple", "garden", "window", "music", "yellow", "paper", "coffee",
    "table", "orange", "morning", "happy", "water", "basket", "rabbit", "lemon", "pencil",
    "cloud", "button", "candle", "dragon", "meadow", "guitar", "hammer", "island", "jacket",
    "kettle", "ladder", "market", "needle", "pocket", "rocket", "saddle", "tunnel", "velvet",
    "wagon", "zipper", "blanket", "mirror",
)
WORDS_PER_VOICE = 4
GAP_SAMPLES = 800  # 50 ms of silence between utterances so Vorbis frames do not smear across
TRIM_DB = 35.0  # a 10 ms frame is speech if its RMS is within this many dB of the loudest frame
PEAK = 0.5  # peak level of every utterance; headroom for the lossy codec
VORBIS_COMPRESSION = 0.7  # soundfile's 0 (best) .. 1 (smallest); about 37 kbit/s here


def render(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance as float32 at 16 kHz, trimmed and peak-normalised. Shape (samples,)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "utterance.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                       check=True)
        audio, rate = sf.read(path, dtype="float64")
    if rate != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    audio = resample_poly(audio, SAMPLE_RATE, ESPEAK_RATE)
    audio = trim(audio)
    return (audio * (PEAK / np.abs(audio).max())).astype(np.float32)


def trim(audio: np.ndarray, frame: int = SAMPLE_RATE // 100) -> np.ndarray:
    """Cut leading/trailing 10 ms frames quieter than TRIM_DB below the loudest frame."""
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    loud = np.nonzero(rms >= rms.max() * 10 ** (-TRIM_DB / 20))[0]
    return audio[loud[0] * frame:(loud[-1] + 1) * frame]


def voices() -> list[tuple[str, str]]:
    """(accent, variant) pairs: variant k is spoken with accents k and k + 1 (cyclically)."""
    return [(ACCENTS[(k + a) % len(ACCENTS)], variant)
            for k, variant in enumerate(VARIANTS) for a in range(ACCENTS_PER_VARIANT)]


def main() -> None:
    rng = np.random.default_rng(SEED)
    out = HERE / "voices"
    out.mkdir(exist_ok=True)
    stems = []
    for index, (accent, variant) in enumerate(voices()):
        voice = f"{accent}+{variant}"
        base = int(rng.integers(BASE_SPEED_RANGE[0], BASE_SPEED_RANGE[1] + 1))
        pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
        items = [(word, digit, round(base * factor))
                 for factor in SPEED_FACTORS for digit, word in enumerate(DIGIT_WORDS)]
        items += [(WORDS[(index * WORDS_PER_VOICE + k) % len(WORDS)], None, base) for k in range(WORDS_PER_VOICE)]
        file = f"voices/{accent}_{variant}.ogg"
        chunks, offset = [], 0
        for text, digit, speed in items:
            audio = render(text, voice, speed, pitch)
            stems.append(dict(kind="word" if digit is None else "digit", text=text, digit=digit, voice=voice,
                              accent=accent, variant=variant, speed=speed, pitch=pitch, file=file,
                              start=offset, length=len(audio)))
            chunks += [audio, np.zeros(GAP_SAMPLES, np.float32)]
            offset += len(audio) + GAP_SAMPLES
        sf.write(HERE / file, np.concatenate(chunks), SAMPLE_RATE, format="OGG", subtype="VORBIS",
                 compression_level=VORBIS_COMPRESSION)
        print(f"{voice}: {len(items)} utterances, {offset / SAMPLE_RATE:.1f} s")
    # "eSpeak NG text-to-speech: 1.51  Data at: ..." -> "1.51"
    banner = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    version = banner.split(":")[1].split()[0]
    # One stem per line: readable, and small diffs when the stems are regenerated.
    lines = ",\n".join(json.dumps(stem) for stem in stems)
    header = json.dumps(dict(sample_rate=SAMPLE_RATE, espeak_ng=version))[:-1]
    (HERE / "stems.json").write_text(f'{header}, "stems": [\n{lines}\n]}}\n')


if __name__ == "__main__":
    main()
