"""Rendering the embedded corpus's audio on renderer servers (rewiring/corpus/render.py): plain
subprocesses fed chunks of items through pipes, kept up between builds in one process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import subprocess
import sys
import threading
from pathlib import Path

CHUNK = 40  # items rendered per fresh process; fixed, so the audio does not depend on `processes`


def chunks(entries: dict[tuple[str, str], list[dict]]) -> list[list[dict]]:
    """Fixed chunks of items; piper items go in chunks of their own (never two TTS libraries in one
    process), so the chunks, and hence the audio, depend only on the plan."""
    items = [e["item"] for group in entries.values() for e in group]
    piper = [it for it in items if any(p["backend"] == "piper" for p in it.get("parts", []))]
    espeak = [it for it in items if not any(p["backend"] == "piper" for p in it.get("parts", []))]
    return [
        group[i : i + CHUNK] for group in (piper, espeak) for i in range(0, len(group), CHUNK)
    ]  # slow first


_SERVERS: list[subprocess.Popen] = []
_SERVERS_LOCK = threading.Lock()


def _start_server() -> subprocess.Popen:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-c", "from rewiring.corpus.render import serve; serve()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )


def _stop_server(server: subprocess.Popen, kill: bool = False) -> None:
    with contextlib.suppress(OSError):
        server.stdin.close()
    if kill:
        server.kill()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    server.stdout.close()


@atexit.register
def _stop_servers() -> None:
    while _SERVERS:
        _stop_server(_SERVERS.pop())


def render(chunks: list[list[dict]], processes: int, progress: bool) -> list[dict]:
    """Render the chunks on `processes` renderer servers (render.py); results in chunk order.

    The servers are plain subprocesses fed through pipes (no multiprocessing re-import of the
    main module; a crash is an error, not a hung pool). They stay up for the next build in this
    process, since they never synthesise themselves and starting one costs seconds of imports.
    """
    from tqdm import tqdm

    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(chunks)):
        todo.put(i)
    results: list[list[dict] | None] = [None] * len(chunks)
    errors: list[str] = []
    broken: list[subprocess.Popen] = []
    bar_lock = threading.Lock()
    bar = tqdm(
        total=sum(len(c) for c in chunks),
        desc="embedded corpus",
        unit="utt",
        disable=not progress,
        file=sys.stderr,
    )

    def drive(server: subprocess.Popen) -> None:
        while not errors:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                pickle.dump(chunks[i], server.stdin)
                server.stdin.flush()
                status, payload = pickle.load(server.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as e:
                broken.append(server)
                errors.append(f"a renderer server exited (status {server.poll()}): {e!r}")
                return
            if status != "ok":
                errors.append(payload)
                return
            results[i] = payload
            with bar_lock:
                bar.update(len(payload))

    with _SERVERS_LOCK:
        _SERVERS[:] = [s for s in _SERVERS if s.poll() is None]
        while len(_SERVERS) < max(1, processes):
            _SERVERS.append(_start_server())
        threads = [
            threading.Thread(target=drive, args=(s,), daemon=True) for s in _SERVERS[: max(1, processes)]
        ]
        interrupted = True
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.2)  # stays interruptible (Ctrl-C)
            interrupted = False
        finally:
            bar.close()
            # a server that broke, or one interrupted mid-chunk, is in an unknown state: replace it
            for s in set(broken) | (set(_SERVERS) if interrupted else set()):
                _SERVERS.remove(s)
                _stop_server(s, kill=True)
    if errors:
        raise RuntimeError(f"rendering the embedded corpus failed:\n{errors[0]}")
    return [r for chunk in results for r in chunk]  # type: ignore[union-attr]
