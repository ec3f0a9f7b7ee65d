"""Which task file's `prepare(root, out)` adapter reads each real corpus, registered here, by the tasks.

Entries are "module:function" strings, resolved by `adapter` on use: naming the corpora (a CLI's
choices) costs nothing, and preparing one imports only its task file (the first task file pays
~7 s for torch and Lightning; the other five add ~20 ms together, so laziness is for the callers
that need no task at all).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["CORPORA", "adapter"]

CORPORA: dict[str, str] = {
    "librispeech": "tasks.asr:prepare",
    "speech_commands": "tasks.ks:prepare",
    "fluent_speech_commands": "tasks.ic:prepare",
    "voxceleb1": "tasks.sid:prepare",
    "librimix": "tasks.sd:prepare",
    "snips": "tasks.sf:prepare",
}


def adapter(corpus: str) -> Callable[..., dict[str, int]]:
    """The `prepare(root, out, ...)` of CORPUS (it returns the records written per split)."""
    if corpus not in CORPORA:
        raise KeyError(f"no adapter for corpus {corpus!r}; known: {', '.join(CORPORA)}")
    module, name = CORPORA[corpus].split(":")
    return getattr(importlib.import_module(module), name)
