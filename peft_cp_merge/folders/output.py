"""Safe output folders: never replace what the tool did not write, never half-write, never race.

Every folder the tool writes (a merged adapter) goes through :func:`atomic_directory`:

- **Checked first** (:func:`check_output_dir`): the output must not be, contain or lie inside an
  input folder, and must not be or contain the current directory. An existing output is replaced
  only with ``overwrite`` *and* only when this tool wrote it (it holds a ``merge_info.json`` that
  says so) or it is empty: a typo such as ``--out adapters`` for ``--out adapters/merged`` is
  refused instead of deleting the adapters.
- **Exclusive**: a writer holds an advisory lock (``.<name>.lock`` beside the output, ``flock``),
  so of two concurrent writers to the same output exactly one proceeds and the other fails at once
  with :class:`OutputError`. The lock dies with its process, so a killed writer never blocks the next.
- **Atomic**: content is built in a hidden ``.<name>.<token>.partial`` folder beside the output and
  renamed into place only when complete; on an error or interrupt it is removed.
- **Self-cleaning**: a writer killed by SIGKILL leaves its ``.partial`` folder behind; the next
  writer to the same output (holding the lock, so the old writer is gone) removes it. A previous
  output moved aside for replacement (``.<name>.<token>.old``) and never restored is put back.

New folders get the permissions of ``mkdir`` under the process umask (not ``0700``).

Example:
    >>> with atomic_directory("merged", marker="merge_info.json") as tmp:  # doctest: +SKIP
    ...     (tmp / "merge_info.json").write_text('{"tool": "peft-cp-merge 0.1.0"}')
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL lock files without stale detection
    fcntl = None

__all__ = [
    "MARKER",
    "TOOL_NAME",
    "OutputError",
    "atomic_directory",
    "atomic_write_text",
    "check_output_dir",
    "output_lock",
]

logger = logging.getLogger(__name__)

MARKER = "merge_info.json"
TOOL_NAME = "peft-cp-merge"


class OutputError(ValueError):
    """An output folder that cannot be written safely; the message names it and the reason."""


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    out_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] = (),
    *,
    overwrite: bool = False,
    marker: str | None = MARKER,
) -> Path:
    """Refuse an output folder whose writing could lose data; return it resolved.

    Args:
        out_dir: The folder to be written.
        inputs: Folders the run reads; the output must not be, contain or lie inside any of them.
        overwrite: Whether an existing ``out_dir`` may be replaced.
        marker: The file that marks a folder as written by this tool (a JSON object whose ``"tool"``
            starts with ``"peft-cp-merge"``); only such a folder, or an empty one, is replaced.
            ``None``: the folder is written into, never replaced (no existence check).

    Returns:
        ``out_dir``, resolved.

    Raises:
        OutputError: ``out_dir`` overlaps an input or the current directory, lies under a file, or
            exists with content this tool did not write.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.

    Example:
        >>> check_output_dir("/tmp/out", ["/tmp/out/a"])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        peft_cp_merge.folders.output.OutputError: Output /tmp/out contains the input /tmp/out/a
    """
    out = _resolve(out_dir)
    for item in inputs:
        path = _resolve(item)
        if _is_within(path, out):
            what = "is the input" if path == out else "contains the input"
            raise OutputError(f"Output {out} {what} {path}; choose a new folder for the output")
        if _is_within(out, path):
            raise OutputError(f"Output {out} lies inside the input {path}; choose a folder outside it")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out):
        raise OutputError(
            f"Output {out} is or contains the current directory {cwd}; choose a new folder for the output"
        )
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"Output {out} cannot be created: {parent} is a file, not a folder")
    if marker is not None:
        _check_replaceable(out, overwrite=overwrite, marker=marker)
    elif out.exists() and not out.is_dir():
        raise OutputError(f"Output {out} exists and is not a folder")
    return out


def _check_replaceable(out: Path, *, overwrite: bool, marker: str) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"Output {out} exists and is not a folder; refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"Output {out} exists (pass overwrite / --overwrite to replace it)")
    if next(out.iterdir(), None) is not None and not _written_by_tool(out / marker):
        raise OutputError(
            f"Output {out} exists and was not written by {TOOL_NAME} (no {marker} of ours in it); "
            "--overwrite only replaces a folder this tool wrote. Choose a new folder, or remove it yourself"
        )


def _written_by_tool(marker: Path) -> bool:
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and str(info.get("tool", "")).startswith(TOOL_NAME)


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive writer's lock of ``out_dir`` (``.<name>.lock`` beside it).

    Raises:
        OutputError: Another process holds the lock (it is writing ``out_dir`` now).
    """
    out = _resolve(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    if fcntl is None:  # pragma: no cover
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise _busy(out, lock) from None
    else:
        fd = _flock(out, lock)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        # Unlink before unlocking: a waiter that opened the old file sees the inode change and fails.
        with _suppress_os_error():
            lock.unlink()
        os.close(fd)


def _flock(out: Path, lock: Path) -> int:
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The holder may have unlinked the file between our open and our lock: then ours is stale.
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise _busy(out, lock) from None
    os.ftruncate(fd, 0)
    return fd


def _busy(out: Path, lock: Path) -> OutputError:
    try:
        holder = f" (pid {lock.read_text().strip()})"
    except OSError:
        holder = ""
    return OutputError(
        f"Output {out} is being written by another {TOOL_NAME} process{holder}; wait for it to finish "
        "or choose another folder"
    )


@contextmanager
def _suppress_os_error() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        logger.info("Ignored: %s", exc)


def _clean_stale(out: Path) -> None:
    """Remove leftovers of killed writers of ``out``; put back an output moved aside and never restored.

    Only called while holding the lock, so no live writer owns these folders.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.[0-9a-f]+\.(partial|old)$")
    for leftover in sorted(out.parent.iterdir()):
        match = pattern.match(leftover.name)
        if match is None or not leftover.is_dir():
            continue
        if match.group(1) == "old" and not out.exists():
            leftover.rename(out)
            warnings.warn(f"Restored {out} from {leftover.name}, left by an interrupted run", stacklevel=4)
            continue
        logger.info("Removing %s, left by an interrupted run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _new_temporary(out: Path, suffix: str) -> Path:
    while True:
        tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.{suffix}"
        try:
            tmp.mkdir()  # 0o777 under the umask, like any folder the user creates
        except FileExistsError:
            continue
        return tmp


@contextmanager
def atomic_directory(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    marker: str | None = MARKER,
) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``out_dir`` only when complete.

    Under the writer's lock: leftovers of killed writers are cleaned, ``out_dir`` is checked again
    (:func:`check_output_dir`), the block fills a hidden temporary folder beside ``out_dir``, which
    then replaces ``out_dir`` (the old content is removed only after the new one is in place). If the
    block raises or is interrupted the temporary folder is removed and ``out_dir`` keeps its state.

    Args:
        out_dir: Destination folder.
        overwrite: Replace an existing ``out_dir`` (only one this tool wrote, or an empty one).
        inputs: Folders that the output must not overlap.
        marker: See :func:`check_output_dir`; the block must write it for the folder to be
            replaceable later. ``None`` disables the check that an existing folder is ours.

    Yields:
        The temporary folder to fill.

    Raises:
        OutputError: See :func:`check_output_dir`; or another process is writing ``out_dir``.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.

    Example:
        >>> with atomic_directory("merged") as tmp:  # doctest: +SKIP
        ...     (tmp / "adapter_config.json").write_text("{}")
    """
    out = check_output_dir(out_dir, inputs, overwrite=overwrite, marker=marker)
    if marker is None and out.exists() and not overwrite:
        raise FileExistsError(f"Output {out} exists (pass overwrite / --overwrite to replace it)")
    with output_lock(out):
        _clean_stale(out)
        check_output_dir(out, inputs, overwrite=overwrite, marker=marker)
        tmp = _new_temporary(out, "partial")
        try:
            yield tmp
            if out.exists():
                old = tmp.with_name(tmp.name.removesuffix(".partial") + ".old")
                out.rename(old)
                try:
                    tmp.rename(out)
                except BaseException:
                    old.rename(out)
                    raise
                shutil.rmtree(old)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a hidden temporary file beside ``path``, is flushed to disk (``fsync``) and
    renamed over ``path``; on any error the temporary file is removed.

    Example:
        >>> atomic_write_text("library.json", "{}")  # doctest: +SKIP
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with _suppress_os_error():
            temporary.unlink()
        raise
