"""Reading and writing the project's files safely: strict YAML, atomic writes.

One home for what every module that touches a file needs, so that a rule (a duplicate key is an
error; readers never see a torn file; a failed write leaves no temporary behind) holds everywhere
at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shlex
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from .cli import UserError

# ---------------------------------------------------------------------------------------------
# Small helpers every module that names a file or an error needs


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line error shows of an error raised deeper down."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def display_path(path: str | os.PathLike) -> str:
    """A path as a user would type it from the current folder: relative when below it, else
    absolute; always with forward slashes."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return p.resolve().as_posix()


def shell_path(path: str | os.PathLike) -> str:
    """:func:`display_path` quoted for a POSIX shell, for commands printed to be run as written
    (a folder with a space or a quote in its name stays one argument)."""
    return shlex.quote(display_path(path))


# ---------------------------------------------------------------------------------------------
# Strict YAML: a file the user gave is read completely or refused in one line naming it

#: Deepest nesting of lists and mappings a YAML file may have (the project's files use < 6).
MAX_YAML_DEPTH = 64


class InputFileError(UserError, ValueError):
    """A file the user gave cannot be read as what it should be; the message starts with its name.

    A :class:`~wasearch.cli.UserError` (the command-line scripts print it as one ``error:`` line
    and exit with code 2) and a ``ValueError`` (for library callers).
    """


def read_text(path: str | os.PathLike, *, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark is dropped).

    ``what`` names the kind of file in messages (``"space file"``). Raises
    :class:`InputFileError` naming the file when it cannot be read, holds NUL bytes (a binary
    file) or is not valid UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputFileError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if b"\0" in data:
        raise InputFileError(
            f"{path}: binary data (a NUL byte at offset {data.index(0)}); the {what} must be "
            "UTF-8 text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            f"the {what} must be UTF-8 text"
        ) from None


def load_yaml(path: str | os.PathLike, *, what: str = "YAML file") -> Any:
    """Read and parse a YAML file strictly: :func:`read_text`, then :func:`parse_yaml`."""
    return parse_yaml(read_text(path, what=what), source=str(path))


def parse_yaml(text: str, *, source: str) -> Any:
    """Parse YAML text with a safe loader (plain data only: nothing in the text is executed).

    Stricter than ``yaml.safe_load``: a key given twice in one mapping is an error (instead of
    the last one silently winning), and so is nesting deeper than :data:`MAX_YAML_DEPTH`
    levels (or a structure that contains itself). Every problem raises one
    :class:`InputFileError` line that starts with ``source`` (the file name) and says where.
    """
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except _DuplicateKeyError as err:
        raise InputFileError(
            f"{source}: line {err.line}: duplicate key {err.key!r} (first on line "
            f"{err.first_line}); give each key once"
        ) from None
    except yaml.MarkedYAMLError as err:
        if "nesting depth" in str(err.problem):  # libyaml's own limit (1000 levels)
            raise InputFileError(_too_deep(source)) from None
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "unreadable"
        raise InputFileError(f"{source}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise InputFileError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:  # the pure-Python parser recurses once per level
        raise InputFileError(_too_deep(source)) from None
    if not _depth_ok(data):
        raise InputFileError(_too_deep(source))
    return data


def _too_deep(source: str) -> str:
    return (
        f"{source}: nested deeper than {MAX_YAML_DEPTH} levels of lists and mappings (or a "
        "structure that contains itself); not a file of this project"
    )


def _depth_ok(data: Any) -> bool:
    """Whether no list or mapping lies deeper than :data:`MAX_YAML_DEPTH` (iterative: a deep
    structure cannot exhaust the stack here). YAML aliases share objects: one is visited again
    only when reached at a greater depth, so the walk stays linear in size times depth."""
    deepest: dict[int, int] = {}
    stack = [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if not isinstance(obj, dict | list):
            continue
        if depth > MAX_YAML_DEPTH:
            return False
        if deepest.get(id(obj), 0) >= depth:
            continue
        deepest[id(obj)] = depth
        children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        stack.extend((child, depth + 1) for child in children)
    return True


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: str, line: int, first_line: int, mark: Any) -> None:
        super().__init__(None, None, f"duplicate key {key!r}", mark)
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's when installed), refusing a mapping key given twice."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges; a key after it overrides, as YAML means
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                        raise _DuplicateKeyError(shown, line, first[key], key_node.start_mark)
                    first[key] = line
                except TypeError:  # an unhashable key: the base class says so
                    continue
        return super().construct_mapping(node, deep=deep)


# ---------------------------------------------------------------------------------------------
# Atomic writes: a reader sees the old file or the new one, never a torn one


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose content replaces ``path`` when the ``with`` block ends without error.

    The content goes to a temporary file with a unique name in the same folder
    (``.<name>.<random>.tmp``, so concurrent writers never share one), is flushed to the disk
    (``fsync``) and renamed over ``path`` (``os.replace``, atomic on POSIX). On any failure (a
    full disk, a read-only folder, an exception or Ctrl-C in the block) the temporary file is
    removed and ``path`` keeps its old content. The new file gets the mode a plain ``open`` would
    give it (``0o666`` less the umask). An ``OSError`` about the temporary file is raised again
    naming ``path``, the file the caller knows.

        with atomic_writer(run_dir / "best.pt") as fh:
            torch.save(state, fh)
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _naming(err, path, None) from err
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, 0o666 & ~_umask())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _naming(err, path, tmp) from err
        raise


def _naming(err: OSError, path: Path, tmp: str | None) -> OSError:
    """``err`` about ``path`` instead of the temporary file (same errno, same subclass); ``tmp``
    None: the temporary file could not be created (whatever name it had)."""
    if err.errno is None or (tmp is not None and err.filename not in (None, tmp)):
        return err
    return OSError(err.errno, err.strerror, os.fspath(path))


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# A write the machine refused: the user's to fix (free space, a writable folder), not a bug

#: ``errno`` values of a refused write: full disk or quota, read-only file system, permissions,
#: a path through a regular file (``results/x/y`` where ``results/x`` is a file), a file where a
#: folder should be made (``EEXIST`` from ``mkdir``) or a folder where a file should be written.
REFUSED_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
     errno.EISDIR, errno.EEXIST}
)  # fmt: skip
_KINDS = {errno.ENOSPC: "full", errno.EDQUOT: "full"} | dict.fromkeys(
    (errno.ENOTDIR, errno.EISDIR, errno.EEXIST), "path"
)
#: SQLite result codes (``sqlite3.Error.sqlite_errorname``) of the same kind.
_SQLITE_REFUSED = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")


@dataclass(frozen=True)
class RefusedWrite:
    """Why the machine refused a write; ``str()`` is one line."""

    path: str | None  # the file or folder; None for a database (its caller knows the storage)
    reason: str  # "No space left on device", "database or disk is full", ...
    kind: str  # "full" (disk or quota), "denied" (read-only, no permission), "path" (not a folder)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}" if self.path else self.reason


def refused_write(err: BaseException) -> RefusedWrite | None:
    """The refused write behind ``err``, else None.

    Looks at ``err`` and the exceptions it was raised from or while handling (Optuna and
    SQLAlchemy wrap the database's error twice): an ``OSError`` with one of
    :data:`REFUSED_ERRNOS`, or an SQLite error that says the database or its disk is full,
    read-only or cannot be opened.
    """
    seen: set[int] = set()
    queue: list[BaseException | None] = [err]
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in REFUSED_ERRNOS:
            path = None if e.filename is None else os.fsdecode(e.filename)
            return RefusedWrite(path, e.strerror or str(e), _KINDS.get(e.errno, "denied"))
        code = getattr(e, "sqlite_errorname", None)
        if isinstance(code, str) and code.startswith(_SQLITE_REFUSED):
            kind = "full" if code == "SQLITE_FULL" else "denied"
            return RefusedWrite(None, str(e) or code, kind)
        queue += [e.__cause__, e.__context__]
    return None


@contextlib.contextmanager
def refused_writes_as_user_errors(
    *, storage: str | None = None, flag: str | None = None
) -> Iterator[None]:
    """Turn a refused write (:func:`refused_write`) in the block into one :class:`UserError`
    line naming the file, or the ``storage`` (a redacted URL) for a database error, and the
    ``flag`` that chose the folder. Anything else passes through untouched (a bug keeps its
    traceback)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        refused = refused_write(err)
        if refused is None:
            raise
        raise UserError(user_message(refused, storage=storage, flag=flag)) from None


def user_message(
    refused: RefusedWrite, *, storage: str | None = None, flag: str | None = None
) -> str:
    """One line for a refused write: what, why, what to do. ``flag`` (``--results``) is offered
    as the way out for a file or folder, not for a database the user named."""
    if refused.path is None and storage:
        return f"storage {storage}: {refused}" + (
            "; free some space and run the command again" if refused.kind == "full" else ""
        )
    other = f"choose another {flag}" if flag else ""
    if refused.kind == "full":
        return f"{refused}; free some space and run the command again"
    if refused.kind == "path":
        return f"{refused}" + (f"; {other}" if other else "")
    return f"{refused}; make that folder writable" + (f" or {other}" if other else "")
