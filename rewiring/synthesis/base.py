"""The one synthesis protocol every backend implements, and the text every backend can say.

Every backend (festival, piper, espeak, coqui) is known to say lower-case ASCII letters, digits and
plain punctuation (`SAYABLE`); each reads digits itself. Real transcripts (SNIPS, FSC, VoxCeleb
metadata) also hold currency, dates written with slashes, percent signs, typographic punctuation
and accented Latin letters. Left to the backends, espeak (and piper, which phonemises through it)
reads "$3.50" as "dollar three point five zero" and "12/05/2021" as "twelve slash zero five
slash two thousand twenty one", and Festival's text2wave only takes ASCII here. So they are
rewritten once, here, into words in that alphabet, with `num2words` (LGPL-2.1) for the numbers and
`anyascii` (ISC) for the Latin letters, and every backend then says the same words.

Only characters outside `SAYABLE` are rewritten: a text that was already sayable comes out exactly
as before, so the synthesis cache's keys (which hash the normalised text) stay valid. Text in
another script (Han, Cyrillic, ...) is refused with that reason: no voice here can say it.
"""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from decimal import Decimal

import numpy as np


class SynthesisError(ValueError):
    """Text that a backend cannot say; the message names the text (truncated).

    Callers may skip a record on this error, so it must never stand for a broken backend:
    that is `BackendError`.
    """


class BackendError(RuntimeError):
    """The backend itself cannot run (not installed, crashed, timed out): never skipped silently."""


def _excerpt(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


# The alphabet every backend says (checked by synthesising with each); digits are read by the backend.
SAYABLE = re.compile(r"^[a-z0-9 .,;:!?'\"()\-]*$")
_HAS_WORD = re.compile(r"[a-z0-9]")
_HAS_LETTER_OR_DIGIT = re.compile(r"[^\W_]")

# Typographic punctuation and invisible characters NFKC leaves as they are.
_PUNCT = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u2039": "'", "\u203a": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": " - ", "\u2013": " - ", "\u2014": ", ", "\u2015": ", ",
        "\u2212": " minus ", "\u2044": "/", "\u2022": ", ", "\u00b7": " ", "\u00a1": "", "\u00bf": "",
        "\u00ad": "", "\u200b": "", "\u200c": "", "\u200d": "", "\ufeff": "",
    }
)  # fmt: skip

# Symbols read as a word (after currency amounts and dates have had their turn).
_SYMBOLS = {
    "%": " percent ", "&": " and ", "+": " plus ", "=": " equals ", "@": " at ", "#": " number ",
    "°": " degrees ", "/": " slash ", "×": " times ", "$": " dollars ", "€": " euros ", "£": " pounds ",
    "¥": " yen ", "₹": " rupees ",
}  # fmt: skip

# symbol -> (one, many, one hundredth, many hundredths)
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", None, None),
    "₹": ("rupee", "rupees", "paisa", "paise"),
}
_SYM = "".join(map(re.escape, _CURRENCIES))
_PREFIX_MONEY = re.compile(rf"([{_SYM}])\s?(\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.(\d+))?")
_SUFFIX_MONEY = re.compile(rf"(?<![\d.,])(\d+)(?:[.,](\d{{1,2}}))?\s?([{_SYM}])")
_DATE = re.compile(r"(?<![\d/])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?![\d/])")
_MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)  # fmt: skip


def _words(n: int | Decimal) -> str:
    from num2words import num2words

    return num2words(n, lang="en").replace(",", "")


def _money(symbol: str, whole: str, fraction: str | None) -> str:
    one, many, cent, cents = _CURRENCIES[symbol]
    units = int(whole.replace(",", ""))
    if fraction is not None and (len(fraction) > 2 or cent is None):
        return f" {_words(Decimal(f'{units}.{fraction}'))} {many} "
    out = f"{_words(units)} {one if units == 1 else many}"
    hundredths = int(fraction.ljust(2, "0")) if fraction else 0
    if hundredths:
        out += f" and {_words(hundredths)} {cent if hundredths == 1 else cents}"
    return f" {out} "


def _date(m: re.Match) -> str:
    """A numeric date, month first as en-US reads it (the voices are en-US), unless only day first fits."""
    a, b, year = int(m.group(1)), int(m.group(2)), m.group(3)
    if 1 <= a <= 12 and 1 <= b <= 31:
        month, day = a, b
    elif 1 <= b <= 12 and 1 <= a <= 31:
        month, day = b, a
    else:
        return m.group(0)  # not a date: its slashes are read as such
    from num2words import num2words

    said = num2words(int(year), lang="en", to="year").replace(",", "")
    return f" {_MONTHS[month - 1]} {num2words(day, lang='en', to='ordinal')} {said} "


def _script(c: str) -> str:
    name = unicodedata.name(c, "")
    return name.split()[0] if name else f"U+{ord(c):04X}"


def _fold_latin(text: str) -> str:
    """Accented and other non-ASCII Latin letters to ASCII (é -> e, ß -> ss, ø -> o)."""
    if text.isascii():
        return text
    from anyascii import anyascii

    return "".join(anyascii(c).lower() if not c.isascii() and _script(c) == "LATIN" else c for c in text)


def _basic(text: str) -> str:
    """NFKC, lower case, plain quotes, single spaces: the whole normalisation of text that was sayable."""
    norm = unicodedata.normalize("NFKC", text).lower()
    norm = norm.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(norm.split())


def _rewrite(norm: str) -> str:
    """Rewrite what lies outside `SAYABLE` into words; what lies inside is left as it is."""
    out = norm.translate(_PUNCT)
    out = _PREFIX_MONEY.sub(lambda m: _money(m.group(1), m.group(2), m.group(3)), out)
    out = _SUFFIX_MONEY.sub(lambda m: _money(m.group(3), m.group(1), m.group(2)), out)
    out = _DATE.sub(_date, out)
    out = "".join(_SYMBOLS.get(c, c) for c in out)
    out = " ".join(_fold_latin(out).split())
    return re.sub(r" ([,.;:!?])", r"\1", out).strip(" ,;:")


def normalize_text(text: str, *, max_chars: int = 400) -> str:
    """The text every backend says and the cache keys on; `SynthesisError` with the reason when none can.

    Text that was already sayable is only lower-cased and its whitespace collapsed (so cache keys
    stay as they were); currency, slashed dates, symbols, typographic punctuation and accented
    Latin letters are rewritten into words; other scripts, and symbols no one reads aloud, are refused.
    """
    if text is None:
        raise SynthesisError("no text to synthesise (None)")
    if not isinstance(text, str):
        raise SynthesisError(f"text must be a string, got {type(text).__name__}")
    norm = _basic(text)
    if not norm:
        raise SynthesisError(f"empty text: {text!r}")
    if not SAYABLE.match(norm):
        foreign = sorted(
            {c for c in norm if (c.isalpha() or c.isdigit()) and not c.isascii() and _script(c) != "LATIN"}
        )
        if foreign:
            scripts = ", ".join(sorted({_script(c) for c in foreign}))
            if not any(c.isascii() and c.isalnum() for c in norm) and not any(
                _script(c) == "LATIN" for c in norm
            ):
                raise SynthesisError(
                    f"text has no Latin-script letters to say (it is in {scripts} script): {_excerpt(text)!r}"
                )
            raise SynthesisError(
                f"text has letters outside the Latin script ({scripts}) that no voice here can say "
                f"{foreign[:10]}: {_excerpt(text)!r}"
            )
        norm = _rewrite(norm)
    if not _HAS_WORD.search(norm):
        raise SynthesisError(f"text has no letters or digits to say: {_excerpt(text)!r}")
    if len(norm) > max_chars:
        raise SynthesisError(
            f"text too long to synthesise ({len(norm)} > {max_chars} chars): {_excerpt(text)!r}"
        )
    if not SAYABLE.match(norm):
        bad = sorted({c for c in norm if not SAYABLE.match(c)})
        raise SynthesisError(f"text has characters that no voice here can say {bad}: {_excerpt(text)!r}")
    return norm


class Synthesizer(ABC):
    """`synthesize(text) -> (float32 mono waveform, sample_rate)`.

    Backends implement `_synthesize` on text that `synthesize` has already normalised and checked,
    so no backend can be reached with unchecked text, and every result passes the same
    post-condition. `cache_params()` must name everything that changes the sound (voice and
    settings), since the synthesis cache keys on it: two configurations that sound different must
    never share entries. Heavy resources (a loaded voice, a model) are loaded lazily and left out of
    the pickled state, so each data-loader worker loads its own.
    """

    name: str = "base"
    max_chars: int = 400

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Say `text`; SynthesisError for text that cannot be said, never an empty waveform."""
        norm = normalize_text(text, max_chars=self.max_chars)
        wav, sr = self._synthesize(norm)
        return self._checked(wav, sr, norm)

    def synthesize_many(self, texts: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        """Say several texts; backends with a per-call start-up cost override `_synthesize_many`.

        Raises on the first text that fails; the cache then falls back to one text at a time to
        find which.
        """
        norms = [normalize_text(t, max_chars=self.max_chars) for t in texts]
        if not norms:
            return []
        out = self._synthesize_many(norms)
        return [self._checked(w, sr, t) for (w, sr), t in zip(out, norms, strict=True)]

    @abstractmethod
    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Say normalised `text`: (waveform, sample_rate) at the backend's own rate."""

    def _synthesize_many(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        return [self._synthesize(t) for t in texts]

    @abstractmethod
    def cache_params(self) -> dict:
        """Voice and every parameter that changes the audio, JSON-serialisable."""

    def reseed(self, seed: int) -> None:
        """Restart the backend's sampling noise from `seed`, so that the texts said next sound the
        same on any machine and in any process; `fill_cache` calls it before each batch of texts.
        A no-op here: festival and espeak have no sampling noise, and coqui draws its noise from
        torch's global generator, which belongs to the training run."""
        return None

    def _checked(self, wav: np.ndarray, sr: int, text: str) -> tuple[np.ndarray, int]:
        """Common post-condition: a non-empty, finite, non-silent float32 mono waveform."""
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size == 0 or not np.isfinite(wav).all() or float(np.abs(wav).max()) < 1e-4:
            raise SynthesisError(f"{self.name} produced no usable audio for {_excerpt(text)!r}")
        return wav, int(sr)
