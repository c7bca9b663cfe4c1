"""The sha256 of a file, read in chunks (model weights of several GB never sit in memory whole)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """sha256 (hex) of the file at ``path``, read in ``chunk``-byte blocks (16 MiB).

    >>> import os, tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...     _ = f.write(b"abc")
    >>> file_sha256(f.name)[:16]
    'ba7816bf8f01cfea'
    >>> os.remove(f.name)
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
