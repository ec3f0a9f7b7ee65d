"""Festival: the paper's neutral voice (text2wave with the default diphone voice, kal_diphone).

Festival runs as a subprocess. Its start-up is a fixed cost per call (about 0.2 to 0.6 s), so
`synthesize_many` says a whole batch in one process, through a script that does exactly what
`text2wave` does per text (checked: byte-identical output).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from rewiring.synthesis.base import BackendError, SynthesisError, Synthesizer, _excerpt

INSTALL_HINT = "install it with: sudo apt-get install festival festvox-kallpc16k"

# text2wave's own per-utterance hooks, one output file per input file, in a single process.
_PRELUDE = """(load (path-append datadir "init.scm"))
(gc-status nil)
{select_voice}
(print (list 'rewiring-voice current-voice))
(defvar rw_fp nil)
(defvar rw_n 0)
(defvar rw_utt nil)
(define (rw_save utt)
  (if (eq? rw_n 0)
      (wave.save.header rw_fp (utt.wave utt) 'riff nil (list (list "numsamples" 0))))
  (set! rw_n (+ rw_n (get_param 'num_samples (wave.info (utt.wave utt)) 0)))
  (wave.save.data.fp (utt.wave utt) rw_fp 'riff nil)
  (set! rw_utt utt))
(set! tts_hooks (list utt.synth rw_save))
(define (rw_say infile outfile)
  (set! rw_fp (fopen outfile "wb"))
  (set! rw_n 0)
  (set! rw_utt nil)
  (tts_file infile (tts_find_text_mode infile auto-text-mode-alist))
  (if rw_utt
      (begin
        (fseek rw_fp 0 0)
        (wave.save.header rw_fp (utt.wave rw_utt) 'riff nil (list (list "numsamples" rw_n)))))
  (fclose rw_fp))
"""
_VOICE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_VOICE_LINE = re.compile(r"\(rewiring-voice (\S+)\)")


class FestivalSynthesizer(Synthesizer):
    """Festival's text2wave voice, run as a subprocess with a timeout.

    Args:
        voice: a Festival voice name without the `voice_` prefix (e.g. `kal_diphone`); None is
            Festival's default voice, which is resolved once so that the cache keys on its name.
        timeout: seconds allowed per text (a batch gets this per text it holds).
    """

    name = "festival"

    def __init__(self, voice: str | None = None, timeout: float = 60.0) -> None:
        if voice is not None and not _VOICE_NAME.match(voice):
            raise ValueError(f"festival voice must be a plain name like 'kal_diphone', got {voice!r}")
        self.voice = voice
        self.timeout = float(timeout)
        self._resolved_voice: str | None = voice

    def cache_params(self) -> dict:
        return {"voice": self.resolved_voice()}

    def resolved_voice(self) -> str:
        """The voice actually used: the default voice's real name when `voice` is None."""
        if self._resolved_voice is None:
            out = self._run(_PRELUDE.format(select_voice=""), timeout=self.timeout)
            found = _VOICE_LINE.search(out.stdout)
            if not found or found.group(1) == "nil":
                raise BackendError(f"festival has no default voice ({out.stderr.strip()}); {INSTALL_HINT}")
            self._resolved_voice = found.group(1)
        return self._resolved_voice

    def _festival(self) -> str:
        exe = shutil.which("festival")
        if exe is None:
            raise BackendError(f"festival is not installed; {INSTALL_HINT}")
        return exe

    def _run(self, script: str, *, timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
        exe = self._festival()
        with tempfile.NamedTemporaryFile("w", suffix=".scm", dir=cwd, delete=False) as f:
            f.write(script)
        try:
            return subprocess.run(
                [exe, "--script", f.name], capture_output=True, text=True, timeout=timeout, cwd=cwd
            )
        except subprocess.TimeoutExpired as e:
            raise BackendError(f"festival timed out after {timeout:.0f} s") from e
        finally:
            Path(f.name).unlink(missing_ok=True)

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        return self._synthesize_many([text])[0]

    def _synthesize_many(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        import soundfile as sf

        select = f"(voice_{self.voice})" if self.voice else ""
        with tempfile.TemporaryDirectory(prefix="rewiring-festival-") as tmp:
            lines = [_PRELUDE.format(select_voice=select)]
            for i, text in enumerate(texts):
                (Path(tmp) / f"{i}.txt").write_text(text + "\n", encoding="ascii")
                lines.append(f'(rw_say "{tmp}/{i}.txt" "{tmp}/{i}.wav")')
            out = self._run("\n".join(lines) + "\n", timeout=self.timeout * len(texts), cwd=tmp)
            if not _VOICE_LINE.search(out.stdout):
                # the voice could not be selected: nothing to do with the text
                raise BackendError(
                    f"festival could not load voice {self.voice or 'default'!r}: "
                    f"{out.stderr.strip()[-300:]}; {INSTALL_HINT}"
                )
            results = []
            for i, text in enumerate(texts):
                path = Path(tmp) / f"{i}.wav"
                if not path.exists() or path.stat().st_size <= 44:
                    raise SynthesisError(
                        f"festival produced no audio for {_excerpt(text)!r} "
                        f"(exit {out.returncode}): {out.stderr.strip()[-300:]}"
                    )
                wav, sr = sf.read(path, dtype="float32", always_2d=True)
                results.append((wav.mean(axis=1), int(sr)))
        return results
