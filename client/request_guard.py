"""The nonces of the coordinator's job requests a site accepted, kept across restarts.

A site agent (:mod:`fedmte.client.site_agent`) refuses a setup, round or finish request whose
``issued_at`` is more than :data:`REQUEST_WINDOW` seconds from the site's clock, and one whose
nonce it accepted before. :class:`SeenNonces` is that memory: one line per accepted nonce
(``<nonce> <issued_at>``) in a file under the site's cache folder, appended and fsynced before
the request is answered, so a site that restarts (a stock SuperNode starts a process per
message) still refuses a replay. A nonce is pruned once its request is older than twice the
window: a replay of it is refused as stale by then.

The file is locked (``flock``) while a nonce is checked and added, so two processes answering
for one site cannot both accept the same request.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from fedmte.protocol.durable import atomic_write

REQUEST_WINDOW = 600.0
"""Seconds a coordinator request stays fresh, either side of the site's clock."""
NONCES_FILE = "seen-nonces.txt"
_NONCE = re.compile(r"^[0-9a-f]{32}$")


class SeenNonces:
    """The nonces a site accepted within the last ``2 * window`` seconds (file ``path``)."""

    def __init__(self, path: Path, *, window: float = REQUEST_WINDOW) -> None:
        self.path = Path(path)
        self.window = float(window)

    def _text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _read(self, text: str | None = None) -> dict[str, float]:
        seen: dict[str, float] = {}
        for line in (self._text() if text is None else text).splitlines():
            parts = line.split()
            if len(parts) == 2 and _NONCE.match(parts[0]):
                try:
                    seen[parts[0]] = float(parts[1])
                except ValueError:
                    continue  # a torn last line after a crash: the line before it is intact
        return seen

    def remember(self, nonce: str, issued_at: float, now: float) -> bool:
        """Add ``nonce`` and return True, or return False if it was seen before (nothing changes)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                text = self._text()
                seen = self._read(text)
                if nonce in seen:
                    return False
                kept = {n: t for n, t in seen.items() if now - t <= 2 * self.window}
                torn = bool(text) and not text.endswith("\n")  # a crash mid-line: start a new line
                if len(kept) < len(seen) and len(seen) > 64:  # compact: drop what the window already refuses
                    atomic_write(self.path, "".join(f"{n} {t!r}\n" for n, t in kept.items()).encode("utf-8"))
                    torn = False
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(("\n" if torn else "") + f"{nonce} {float(issued_at)!r}\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                return True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def __contains__(self, nonce: object) -> bool:
        return isinstance(nonce, str) and nonce in self._read()


__all__ = ["NONCES_FILE", "REQUEST_WINDOW", "SeenNonces"]
