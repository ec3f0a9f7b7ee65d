"""The embedded corpus: a synthetic, seeded stand-in for the six tasks' real corpora, built offline.

Its sentences come from a small grammar, its speakers are espeak voice variants (piper is one
more), with noise and gain; from it come manifests for asr, ks, ic, sid, sd and sf, and an
unlabelled set for pre-training and rewiring. It lets the whole experiment run anywhere; it is
not a claim about real speech.
"""

from rewiring.corpus.build import (
    SIZES,
    SPLITS,
    TASKS,
    build_corpus,
    ensure_corpus,
    is_embedded_root,
    prepare_embedded,
    task_manifest,
)

__all__ = [
    "SIZES",
    "SPLITS",
    "TASKS",
    "build_corpus",
    "ensure_corpus",
    "is_embedded_root",
    "prepare_embedded",
    "task_manifest",
]
