"""Small pieces every stage needs: a stable short hash of JSON-able data, and atomic writes of text
files and of whole folders (a kill or an error never leaves a half-written output in place)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def stable_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON (identities of configs and inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path, error: type[Exception], what: str) -> Any:
    """The JSON in ``path``; a missing or unparsable file raises ``error`` naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise error(f"{what} not found: {path}") from e
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from e


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing any folder there whole or not at all.

    The previous ``dst`` is renamed aside first, restored if the final rename fails, and deleted only
    once ``src`` is in place.
    """
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    try:
        src.rename(dst)
    except BaseException:
        if old is not None and not dst.exists():
            old.rename(dst)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary sibling of ``dst`` to fill; on success it replaces ``dst``
    (:func:`replace_dir`), on an error it is deleted and ``dst`` is left as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
