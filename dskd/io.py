"""Small pieces every stage needs: a stable short hash of JSON-able data, atomic writes of text files
and of whole folders (a kill or an error never leaves a half-written output in place), and the one
artefact contract (format tag, sidecar with fingerprint and inputs hash, open-check with a one-line
error naming the file and the command that rebuilds it, skip-if-built)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dskd.errors import ConfigError

T = TypeVar("T")


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


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON atomically (:func:`write_text_atomic`); values JSON cannot hold become strings."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing any folder there whole or not at all.

    The previous ``dst`` is renamed aside first, restored if the final rename fails, and deleted only
    once ``src`` is in place, unless it is a finished artefact (its ``meta.json`` says ``complete``):
    that one is kept beside as ``<name>.replaced-<UTC time>`` (a rebuild never deletes finished work).
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
    if old is None:
        return
    if _finished_folder(old):
        import time

        kept = dst.with_name(f"{dst.name}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        while kept.exists():
            kept = kept.with_name(f"{kept.name}-{uuid.uuid4().hex[:4]}")
        old.rename(kept)
        print(f"(kept the previous {dst.name} of other inputs as {kept})")
    else:
        shutil.rmtree(old, ignore_errors=True)


def _finished_folder(d: Path) -> bool:
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and bool(meta.get("complete"))


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


# ---------------------------------------------------------------------------------------------------
# The artefact contract: every stage's output (lexicon, sense store, teacher cache, student run folder,
# evaluation and fidelity results) is a folder with a ``meta.json`` sidecar, or a JSON file, that says
# what it is (``format``), what it was built from (``fingerprint``, ``inputs_hash``) and that it is
# whole (``complete: true``, written last). A builder skips when :func:`is_built` says so and writes
# into :func:`atomic_dir`; a reader opens through :func:`open_artefact`, which turns a missing,
# foreign, incomplete or damaged file into one line naming the file and the command that rebuilds it.

META_FILE = "meta.json"


class ArtefactError(Exception):
    """Raised by :func:`open_artefact` when a stage gives no error class of its own."""


@dataclass(frozen=True)
class Artefact:
    """One kind of artefact.

    Args:
        name: The ``format.name`` tag in its sidecar (``dskd-lexicon``).
        version: The ``format.version`` readers accept.
        what: Words for messages (``lexicon``, ``sense store``).
        rebuild: The command that (re)builds it (``dskd lexicon build``).
        error: The stage's error class (a :class:`dskd.errors.DskdError`, printed as one line by the CLI).
    """

    name: str
    version: int
    what: str
    rebuild: str
    error: type[Exception] = ArtefactError

    @property
    def format(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def fail(self, where: Path | str, why: str) -> Exception:
        return self.error(f"{where}: {why}; rebuild it with `{self.rebuild}`")


def sidecar(kind: Artefact, *, fingerprint: str | None = None, inputs_hash: str | None = None, **fields: Any) -> dict:
    """A sidecar dict: format tag, dskd version, fingerprint, inputs hash, the fields, ``complete`` last."""
    from dskd import __version__

    meta: dict[str, Any] = {"format": kind.format, "dskd_version": __version__}
    if fingerprint is not None:
        meta["fingerprint"] = fingerprint
    if inputs_hash is not None:
        meta["inputs_hash"] = inputs_hash
    meta.update({k: v for k, v in fields.items() if k != "complete"})
    meta["complete"] = True
    return meta


def write_sidecar(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` (from :func:`sidecar`) as ``folder/meta.json`` atomically; returns its path."""
    path = Path(folder) / META_FILE
    write_json(path, meta)
    return path


def sidecar_file(path: str | Path) -> Path:
    """Where the sidecar of the artefact at ``path`` lives: a folder's ``meta.json``; a JSON file is
    its own sidecar; any other file (``prompts.jsonl``) has it beside it as ``<name>.meta.json``."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return path / META_FILE
    return path if path.suffix == ".json" else path.with_name(f"{path.name}.{META_FILE}")


def read_sidecar(path: str | Path, kind: Artefact) -> dict[str, Any]:
    """The sidecar of an artefact (:func:`sidecar_file`), checked: present, valid JSON, this kind's
    format and version, complete. Errors are one line naming the file."""
    path = Path(path)
    meta_file = sidecar_file(path)
    if not meta_file.is_file():
        raise kind.fail(
            path, f"{kind.what} not found" if not path.exists() else f"not a {kind.what} (no {meta_file.name})"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise kind.fail(meta_file, f"damaged {kind.what} sidecar ({_why(e)})") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != kind.name:
        got = fmt.get("name") if isinstance(fmt, dict) else fmt
        raise kind.fail(meta_file, f"not a {kind.what} (format {got!r}, expected {kind.name!r})")
    if fmt.get("version") != kind.version:
        raise kind.fail(meta_file, f"{kind.what} format version {fmt.get('version')} (this dskd reads {kind.version})")
    if not meta.get("complete"):
        raise kind.fail(path, f"incomplete {kind.what} (no complete: true)")
    return meta


def is_built(path: str | Path, kind: Artefact, inputs_hash: str | None = None, field: str = "inputs_hash") -> bool:
    """Skip-if-built: ``path`` holds a complete artefact of this kind built from ``inputs_hash`` (the
    sidecar's ``field``; the lexicon's sidecar calls it ``inputs_key``)."""
    try:
        meta = read_sidecar(path, kind)
    except Exception:
        return False
    return inputs_hash is None or meta.get(field) == inputs_hash


def record_inputs(path: str | Path, kind: Artefact, inputs_hash: str, create: bool = False) -> None:
    """Write ``inputs_hash`` (what the artefact at ``path`` was built from) into its sidecar, where
    :func:`is_built` compares it; ``create``: write a bare sidecar of this kind when the output has
    none of its own (a plain file or model folder), else a missing sidecar is an error."""
    meta_file = sidecar_file(path)
    meta = sidecar(kind) if create and not meta_file.exists() else read_sidecar(path, kind)
    meta["inputs_hash"] = inputs_hash
    meta["complete"] = meta.pop("complete")  # stays last
    write_json(meta_file, meta, indent=1 if meta_file == Path(path) else 2)  # a result file keeps its layout


def check_files(folder: str | Path, kind: Artefact, names: Iterator[str] | list[str] | None = None) -> None:
    """Check the data files of an artefact folder without reading their tensors: each ``.safetensors``
    file's header parses and the file is as long as the header says; each ``.json`` file parses.

    Args:
        folder: The artefact folder.
        kind: Its kind (for the error).
        names: Files to check (default: every ``.safetensors`` and ``.json`` file directly in ``folder``).
    """
    folder = Path(folder)
    files = [folder / n for n in names] if names is not None else sorted(folder.glob("*.safetensors"))
    if names is None:
        files += sorted(p for p in folder.glob("*.json") if p.name != META_FILE)
    for f in files:
        if not f.is_file():
            raise kind.fail(f, f"missing file of the {kind.what}")
        if f.suffix == ".safetensors":
            why = safetensors_problem(f)
            if why:
                raise kind.fail(f, f"damaged {kind.what} file ({why})")
        elif f.suffix == ".json":
            try:
                json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise kind.fail(f, f"damaged {kind.what} file ({_why(e)})") from e


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (None when it is): the 8-byte header length, the
    JSON header, and the data length the header's offsets need, checked against the file's size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"truncated: header of {n} bytes, file of {size}"
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"unreadable header: {_why(e)}"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"truncated: {size} of {need} bytes"
    return None


def open_artefact(path: str | Path, kind: Artefact, opener: Callable[[dict[str, Any]], T], files: bool = True) -> T:
    """Open an artefact: check its sidecar and (``files``) its data files, then ``opener(meta)``; an
    error of an unexpected kind while opening becomes the same one-line error naming ``path``."""
    meta = read_sidecar(path, kind)
    if files and Path(path).is_dir():
        check_files(path, kind)
    try:
        return opener(meta)
    except kind.error:
        raise
    except Exception as e:  # a damage the checks above cannot see (safetensors, numpy, json)
        if type(e).__module__.startswith("dskd"):
            raise
        raise kind.fail(path, f"cannot open the {kind.what} ({_why(e)})") from e


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]


# ---------------------------------------------------------------------------------------------------
# Outputs checked before work: a command that writes checks, before it loads a model or reads a corpus,
# that it can create and write its target and that a target already there is its own kind of artefact.


def check_output(
    path: str | Path,
    flag: str,
    *,
    folder: bool,
    kind: Artefact | None = None,
    what: str | None = None,
    accept: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse, as one :class:`dskd.errors.ConfigError` line naming ``flag`` and ``path``, an output that
    cannot be written: a file where a folder goes or the reverse, a parent that is a file or not
    writable, or an existing target of another kind (never replaced: it may be what a user made). Writes
    nothing.

    Args:
        path: The target (a folder when ``folder``, else a file).
        flag: The flag that named it (``--out``).
        folder: Whether the target is a folder.
        kind: The artefact it is: an existing target must carry this kind's ``format.name`` (a folder in
            its ``meta.json``, a JSON file in itself); complete or not, it is then the command's own.
        what: Words for the target (default: ``kind.what``).
        accept: Also accept an existing non-empty target this says is the command's own (a run folder
            with checkpoints but no sidecar yet).
    """
    path = Path(path)
    what = what or (kind.what if kind else ("folder" if folder else "file"))

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{flag} {path}: {why}", flag=flag.lstrip("-"))

    if path.exists() or path.is_symlink():
        meta_file = path / META_FILE if folder else path
        if kind is not None and meta_file.is_file() and meta_file.stat().st_size:
            try:
                json.loads(meta_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(
                    f"{flag} {meta_file}: exists and is damaged ({_why(e)}); move it away or pick another {flag}",
                    flag=flag.lstrip("-"),
                ) from e
        if folder and not path.is_dir():
            raise fail(f"exists and is a file; a {what} is a folder (pick another {flag})")
        if not folder and path.is_dir():
            raise fail(f"exists and is a folder; a {what} is a file (pick another {flag})")
        if not _own_output(path, folder, kind, accept):
            raise fail(f"exists and is not a {what}; refusing to replace it (pick another {flag} or move it)")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise fail("exists and is not writable")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise fail(f"cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"cannot be created: {parent} is not writable")


def _own_output(path: Path, folder: bool, kind: Artefact | None, accept: Callable[[Path], bool] | None) -> bool:
    """Whether the existing ``path`` may be written over: an empty folder, this kind's artefact, or what
    ``accept`` says is the command's own."""
    if folder and not any(p for p in path.iterdir() if not p.name.startswith(".")):
        return True
    if not folder and path.stat().st_size == 0:
        return True
    if accept is not None and accept(path):
        return True
    if kind is None:
        return accept is None
    meta_file = path / META_FILE if folder else path
    try:
        fmt = json.loads(meta_file.read_text()).get("format")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(fmt, dict) and fmt.get("name") == kind.name
