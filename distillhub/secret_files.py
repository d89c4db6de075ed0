"""Secrets generated once into a file of the data dir (the secret key, the demo password)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_or_create_secret(path: Path, *, nbytes: int) -> str:
    """The secret stored in ``path``; when the file is missing, a new URL-safe secret of
    ``nbytes`` random bytes is written there first, mode 0600. O_EXCL makes two processes that
    start together agree on one secret. Returns "" when the file exists but is empty."""
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
