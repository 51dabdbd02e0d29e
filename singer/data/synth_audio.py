"""Synthetic song for the synthetic singers: a sung melody over drums and chords, with known ground truth.

Everything is deterministic from a numpy Generator. The pieces:

- `compose_song`: tempo, key, beat grid, chord progression and a melody of syllables (one note and one
  vowel per syllable, on the beat grid, with rests).
- `render_voice`: a glottal-like harmonic source (additive, about -6 dB/octave after lip radiation) whose
  harmonic amplitudes follow a vowel's formant resonances (F1-F3), pitch from the melody with glides and
  vibrato (~5.5 Hz, +-0.3 semitone), syllable envelopes (attack, sustain, release, gaps), a little breath.
- `render_music`: kick on every beat, snare on beats 2 and 4, hi-hats on eighths, a chord pad and a bass.
- `mouth_track`: the mouth opening driven by the vocal envelope and the vowel (silence -> closed).
- `width_track`: the mouth width driven by the vowel's lip shape (rounded /u/ /o/ narrower, spread /i/ /e/
  wider) as far as the voice sounds (silence -> the rest width): a cue that lives in the formants, not the
  loudness, as singing's does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.signal import butter, sosfilt

# Vowel formants (Hz) and bandwidths (Hz) for a generic adult voice, the openness of the mouth when the
# vowel is sung at full level (in the project's mouth-opening units: inner-lip gap / eye distance), the
# vowel's intrinsic loudness (open vowels are louder), and the lip width at full level relative to the rest
# width ("spread"). The lip shape is what moves F2: rounding (/u/, /o/) lengthens the vocal tract's front
# cavity and lowers F2, spreading (/i/, /e/) raises it; so "spread" follows F2's order (i > e > a > o > u) and
# a listener can hear the width in the spectrum, not in the level.
VOWELS: dict[str, dict] = {
    "a": {
        "formants": (800.0, 1200.0, 2600.0),
        "bandwidths": (90.0, 110.0, 160.0),
        "open": 0.50,
        "level": 1.0,
        "spread": 1.0,
    },
    "o": {"formants": (500.0, 880.0, 2500.0), "bandwidths": (80.0, 100.0, 150.0), "open": 0.38, "level": 0.9,
          "spread": 0.82},
    "e": {
        "formants": (520.0, 1850.0, 2550.0),
        "bandwidths": (80.0, 110.0, 160.0),
        "open": 0.30,
        "level": 0.85,
        "spread": 1.10,
    },
    "u": {"formants": (340.0, 760.0, 2400.0), "bandwidths": (70.0, 90.0, 140.0), "open": 0.22, "level": 0.75,
          "spread": 0.70},
    "i": {
        "formants": (290.0, 2250.0, 3000.0),
        "bandwidths": (60.0, 120.0, 180.0),
        "open": 0.16,
        "level": 0.7,
        "spread": 1.20,
    },
}
VOWEL_NAMES = tuple(VOWELS)

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
# Chord progressions as scale degrees (0-based) of the chord roots, one chord per bar.
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 3)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 4)),
}


def midi_to_hz(m: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(m, np.float64) - 69.0) / 12.0)


@dataclass(frozen=True)
class Syllable:
    onset: float  # s, sound starts
    offset: float  # s, sound has fully decayed (release included)
    midi: float  # note
    vowel: str
    level: float  # 0..1 dynamics


@dataclass
class Song:
    seconds: float
    bpm: float
    beat_times: np.ndarray
    key_midi: int  # tonic of the chords (octave 3)
    mode: str  # "major" | "minor"
    chords: list[tuple[float, float, tuple[int, ...]]]  # (start, end, midi notes)
    syllables: list[Syllable] = field(default_factory=list)

    @property
    def period(self) -> float:
        return 60.0 / self.bpm


@dataclass(frozen=True)
class Voice:
    """A singer's voice (fixed per subject): register and vibrato."""

    low_midi: int  # lowest note of the melody range
    span: int  # semitones of range
    vibrato_hz: float
    vibrato_semitones: float
    formant_scale: float  # >1 for a smaller vocal tract (higher formants)
    breath: float  # breath noise level relative to the voiced part


def draw_voice(rng: np.random.Generator) -> Voice:
    low = int(rng.choice([48, 52, 55, 57, 60]))  # C3 .. C4
    return Voice(
        low_midi=low,
        span=int(rng.integers(10, 14)),
        vibrato_hz=float(rng.uniform(5.0, 6.0)),
        vibrato_semitones=float(rng.uniform(0.22, 0.35)),
        formant_scale=float(1.0 + (low - 48) / 12 * 0.15 + rng.uniform(-0.03, 0.03)),
        breath=float(rng.uniform(0.02, 0.05)),
    )


def compose_song(rng: np.random.Generator, seconds: float, voice: Voice) -> Song:
    """Tempo 90-130 BPM, first beat 0.25-0.5 s in (silence before it), a 4-chord loop one bar per chord, a melody of syllables
    on an eighth-note grid (notes of the scale, chord tones on strong beats) with rests."""
    bpm = float(rng.integers(90, 131))
    period = 60.0 / bpm
    beat0 = float(rng.uniform(0.25, 0.5))
    beat_times = beat0 + period * np.arange(int(np.floor((seconds - beat0) / period)) + 1)
    beat_times = beat_times[beat_times < seconds]
    mode = "major" if rng.random() < 0.6 else "minor"
    scale = MAJOR if mode == "major" else MINOR
    key_midi = int(rng.integers(45, 57))  # A2 .. G#3
    progression = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]

    chords = []
    bar = 4 * period
    n_bars = int(np.ceil((seconds - beat0) / bar)) + 1
    for b in range(-1, n_bars):
        degree = progression[b % len(progression)]
        root = key_midi + scale[degree]
        third = key_midi + scale[(degree + 2) % 7] + 12 * ((degree + 2) // 7)
        fifth = key_midi + scale[(degree + 4) % 7] + 12 * ((degree + 4) // 7)
        chords.append((beat0 + b * bar, beat0 + (b + 1) * bar, (root, third, fifth)))

    # melody pitches: scale notes in the voice's range, transposed to the key
    tonic_pc = key_midi % 12
    pitches = [
        m for m in range(voice.low_midi, voice.low_midi + voice.span + 1) if (m - tonic_pc) % 12 in scale
    ]
    song = Song(seconds, bpm, beat_times, key_midi, mode, chords)
    step = period / 2  # eighth-note grid
    t = beat0 + step * int(rng.integers(0, 3))  # the voice enters on or just after the first beat
    prev = int(rng.integers(len(pitches)))
    rested = True
    while t < seconds - 0.15:
        if not rested and rng.random() < 0.12:  # a rest of one or two beats, never two rests in a row
            t += step * int(rng.choice([2, 4]))
            rested = True
            continue
        rested = False
        length = step * int(rng.choice([1, 2, 2, 3, 4], p=[0.15, 0.35, 0.2, 0.15, 0.15]))
        chord = next(c for c in chords if c[0] <= t < c[1])[2]
        strong = abs(((t - beat0) / period) - round((t - beat0) / period)) < 1e-6
        candidates = [i for i in range(len(pitches)) if abs(i - prev) <= 3] or list(range(len(pitches)))
        if strong:
            tones = [i for i in candidates if pitches[i] % 12 in {n % 12 for n in chord}]
            candidates = tones or candidates
        prev = int(rng.choice(candidates))
        gap = float(rng.uniform(0.06, 0.11))  # silence before the next syllable
        onset = t
        offset = min(t + length - gap, seconds)
        if offset - onset > 0.08:
            song.syllables.append(
                Syllable(
                    onset,
                    offset,
                    float(pitches[prev]),
                    str(rng.choice(VOWEL_NAMES)),
                    float(rng.uniform(0.75, 1.0)),
                )
            )
        t += length
    return song


# ----------------------------------------------------------------------------------------------- voice


def _syllable_envelope(n: int, sr: int, attack: float = 0.04, release: float = 0.07) -> np.ndarray:
    """Raised-cosine attack, gently decaying sustain, raised-cosine release, over n samples."""
    env = np.ones(n)
    a = min(int(attack * sr), n // 3)
    r = min(int(release * sr), n // 2)
    if a:
        env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    env *= np.exp(-0.25 * np.arange(n) / sr)  # singers fade slightly over a held note
    if r:
        env[n - r :] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(1, r + 1) / r)
    return env


def _formant_gain(freqs: np.ndarray, formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Magnitude of a cascade of second-order resonances at `freqs`, normalised to 1 at DC.

    freqs: (..., K); formants, bandwidths: (..., 3) -> (..., K)
    """
    f = freqs[..., None]
    F = formants[..., None, :]
    B = bandwidths[..., None, :]
    mag = F**2 / np.sqrt((F**2 - f**2) ** 2 + (B * f) ** 2)
    return np.prod(mag, axis=-1)


def render_voice(song: Song, voice: Voice, sr: int, n: int, rng: np.random.Generator) -> dict:
    """Sing the song. Returns {"audio": (n,) float, "envelope": (n,) 0..1 amplitude envelope,
    "openness": (n,) vowel openness, "spread": (n,) vowel lip width (1 = rest), "voiced": (n,) bool}."""
    env = np.zeros(n)
    openness = np.zeros(n)
    spread = np.ones(n)
    midi = np.full(n, np.nan)
    level = np.zeros(n)
    formants = np.zeros((n, 3))
    bands = np.zeros((n, 3))
    last_vowel = song.syllables[0].vowel if song.syllables else "a"
    for s in song.syllables:
        i0, i1 = round(s.onset * sr), min(round(s.offset * sr), n)
        if i1 - i0 < 8:
            continue
        env[i0:i1] = s.level * _syllable_envelope(i1 - i0, sr)
        midi[i0:i1] = s.midi
        v = VOWELS[s.vowel]
        openness[i0:i1] = v["open"]
        spread[i0:i1] = v["spread"]
        level[i0:i1] = v["level"]
        formants[i0:i1] = np.asarray(v["formants"]) * voice.formant_scale
        bands[i0:i1] = v["bandwidths"]
        last_vowel = s.vowel
    # between syllables hold the neighbouring values (only the envelope goes to zero)
    voiced = env > 0
    if not voiced.any():
        midi[:] = voice.low_midi
        v = VOWELS[last_vowel]
        formants[:] = np.asarray(v["formants"]) * voice.formant_scale
        bands[:] = v["bandwidths"]
        level[:] = v["level"]
    else:
        idx = np.where(voiced, np.arange(n), 0)
        np.maximum.accumulate(idx, out=idx)
        first = int(np.argmax(voiced))
        idx[:first] = first
        midi, formants, bands, level, openness_held, spread_held = (
            midi[idx],
            formants[idx],
            bands[idx],
            level[idx],
            openness[idx],
            spread[idx],
        )
        openness = np.where(voiced, openness, openness_held)
        spread = np.where(voiced, spread, spread_held)

    # glides: smooth the note sequence (~35 ms), then vibrato that fades in over 0.2 s of each note
    midi = _smooth(midi, int(0.035 * sr))
    formants = _smooth(formants, int(0.04 * sr))
    level = _smooth(level, int(0.04 * sr))
    t = np.arange(n) / sr
    note_age = np.zeros(n)
    for s in song.syllables:
        i0, i1 = round(s.onset * sr), min(round(s.offset * sr), n)
        note_age[i0:i1] = np.arange(i1 - i0) / sr
    vib_depth = voice.vibrato_semitones * np.clip((note_age - 0.12) / 0.2, 0.0, 1.0)
    drift = _smooth(rng.standard_normal(n // 512 + 2), 4)
    drift = np.interp(np.arange(n), np.arange(len(drift)) * 512, drift) * 0.06
    pitch = midi + vib_depth * np.sin(2 * np.pi * voice.vibrato_hz * t) + drift
    f0 = midi_to_hz(pitch)
    phase = 2 * np.pi * np.cumsum(f0) / sr

    # harmonic amplitudes on a coarse grid (every 64 samples), interpolated per sample
    hop = 64
    grid = np.arange(0, n, hop)
    k_max = int(min(6000.0, sr / 2 - 500) / f0.min())
    k = np.arange(1, k_max + 1)
    fk = f0[grid, None] * k[None, :]
    amps = (1.0 / k) * _formant_gain(fk, formants[grid], bands[grid])
    amps[fk > min(6000.0, sr / 2 - 500)] = 0.0
    amps /= np.sqrt(0.5 * np.sum(amps**2, axis=1, keepdims=True))  # unit RMS carrier for every vowel
    voiced_part = np.zeros(n)
    for j in range(k_max):
        a = np.interp(np.arange(n), grid, amps[:, j])
        if a.max() > 1e-4:
            voiced_part += a * np.sin((j + 1) * phase)
    sos = butter(2, [1500, 5000], btype="bandpass", fs=sr, output="sos")
    breath = sosfilt(sos, rng.standard_normal(n))
    breath *= voice.breath / (np.std(breath) + 1e-12)
    audio = env * level * (voiced_part + breath)
    return {"audio": audio, "envelope": env, "openness": openness, "spread": spread, "voiced": voiced}


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` samples along axis 0, edges held."""
    if width <= 1:
        return np.asarray(x, np.float64)
    x = np.asarray(x, np.float64)
    pad = [(width // 2, width - 1 - width // 2)] + [(0, 0)] * (x.ndim - 1)
    c = np.cumsum(np.pad(x, pad, mode="edge"), axis=0)
    c = np.concatenate([np.zeros((1,) + x.shape[1:]), c], axis=0)
    return (c[width:] - c[:-width]) / width


# ----------------------------------------------------------------------------------------------- music


def _place(track: np.ndarray, sound: np.ndarray, at: float, sr: int) -> None:
    i = round(at * sr)
    if i >= len(track):
        return
    j = min(len(track), i + len(sound))
    if i < 0:
        sound, i = sound[-i:], 0
        j = min(len(track), len(sound))
    track[i:j] += sound[: j - i]


def _onset(t: np.ndarray, rise: float = 0.0015) -> np.ndarray:
    """A short linear fade-in: step onsets make the AAC encoder overshoot (pre-echo), so drums rise in ~1 ms."""
    return np.minimum(1.0, t / rise)


def _kick(sr: int) -> np.ndarray:
    t = np.arange(int(0.35 * sr)) / sr
    freq = 48 + 90 * np.exp(-t / 0.04)
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.12)
    click = np.exp(-t / 0.004) * 0.5
    return (body + click) * _onset(t)


def _snare(sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.25 * sr)) / sr
    sos = butter(2, [1200, 7000], btype="bandpass", fs=sr, output="sos")
    noise = sosfilt(sos, rng.standard_normal(len(t)))
    noise /= np.abs(noise).max() + 1e-12
    tone = np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.05)
    return (0.8 * noise * np.exp(-t / 0.07) + 0.5 * tone) * _onset(t)


def _hat(sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.06 * sr)) / sr
    sos = butter(2, 7000, btype="highpass", fs=sr, output="sos")
    noise = sosfilt(sos, rng.standard_normal(len(t)))
    noise /= np.abs(noise).max() + 1e-12
    return noise * np.exp(-t / 0.015) * _onset(t)


def _pad_note(midi: float, seconds: float, sr: int) -> np.ndarray:
    """A soft saw-like pad note: 6 harmonics at 1/k, slow attack and release."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f = float(midi_to_hz(midi))
    wave = sum(np.sin(2 * np.pi * f * h * t * (1 + 0.0015 * (h % 2))) / h for h in range(1, 7))
    env = np.minimum(1.0, t / 0.15) * np.minimum(1.0, (seconds - t) / 0.2).clip(0, 1)
    return wave * env


def render_music(song: Song, sr: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Drums on the beat grid, a chord pad (one chord a bar) and a bass on beats 1 and 3."""
    drums = np.zeros(n)
    kick, snare, hat = _kick(sr), _snare(sr, rng), _hat(sr, rng)
    period = song.period
    for i, b in enumerate(song.beat_times):
        _place(drums, kick, b, sr)
        if i % 4 in (1, 3):
            _place(drums, 0.7 * snare, b, sr)
        _place(drums, 0.25 * hat, b, sr)
        _place(drums, 0.18 * hat, b + period / 2, sr)
    pads = np.zeros(n)
    bass = np.zeros(n)
    for start, end, notes in song.chords:
        for m in notes:
            _place(pads, _pad_note(m + 12, end - start, sr), start, sr)
        for half in (0, 2):
            tb = start + half * period
            length = int(1.8 * period * sr)
            tt = np.arange(length) / sr
            note = np.sin(2 * np.pi * float(midi_to_hz(notes[0] - 12)) * tt) * np.exp(-tt / (1.2 * period))
            _place(bass, note * np.minimum(1.0, tt / 0.01), tb, sr)
    sos = butter(2, 2500, btype="lowpass", fs=sr, output="sos")
    pads = sosfilt(sos, pads)
    parts = [
        drums / (np.abs(drums).max() + 1e-12),
        pads / (np.abs(pads).max() + 1e-12),
        bass / (np.abs(bass).max() + 1e-12),
    ]
    return 1.0 * parts[0] + 0.35 * parts[1] + 0.45 * parts[2]


# ----------------------------------------------------------------------------------------------- mouth


def mix_take(song: Song, voice: Voice, sr: int, n: int, rng: np.random.Generator, music_level: float,
             peak: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """The sung voice over the music: (mix, vocals) (n,) float32, scaled together so the mix peaks at `peak`,
    with the music at `music_level` x the voice's RMS over its voiced samples; and render_voice's dict."""
    sung = render_voice(song, voice, sr, n, rng)
    music = render_music(song, sr, n, rng)
    vocals = sung["audio"]
    voice_rms = float(np.sqrt(np.mean(vocals[sung["voiced"]] ** 2))) if sung["voiced"].any() else 1.0
    music = music * (music_level * voice_rms / (float(np.sqrt(np.mean(music**2))) + 1e-12))
    mix = vocals + music
    gain = peak / (float(np.abs(mix).max()) + 1e-12)
    return (mix * gain).astype(np.float32), (vocals * gain).astype(np.float32), sung


def _frame_means(drive: np.ndarray, sr: int, frame_times: np.ndarray, fps: float) -> np.ndarray:
    """(n,) per-sample values -> their mean over each video frame's duration, centred on the frame's time."""
    width = max(int(sr / fps), 1)
    c = np.concatenate([[0.0], np.cumsum(drive)])
    n = len(drive)
    centres = np.round(frame_times * sr).astype(int)
    i0 = np.clip(centres - width // 2, 0, n)
    i1 = np.clip(centres + width - width // 2, 0, n)
    return (c[i1] - c[i0]) / np.maximum(i1 - i0, 1)


def mouth_track(voice_out: dict, sr: int, frame_times: np.ndarray, fps: float) -> np.ndarray:
    """Target mouth opening per video frame: vowel openness x the vocal amplitude envelope, averaged over
    the frame's duration (a smoothed envelope). Silence -> 0 (closed)."""
    return _frame_means(voice_out["openness"] * voice_out["envelope"], sr, frame_times, fps)


def width_track(voice_out: dict, sr: int, frame_times: np.ndarray, fps: float) -> np.ndarray:
    """Target mouth width per video frame, relative to the rest width: 1 + (vowel spread - 1) x the vocal
    envelope, averaged over the frame's duration. Silence -> 1 (the rest width); /a/ sung -> 1, /u/ at full
    level -> 0.70, /i/ -> 1.20."""
    return _frame_means(1.0 + (voice_out["spread"] - 1.0) * voice_out["envelope"], sr, frame_times, fps)
