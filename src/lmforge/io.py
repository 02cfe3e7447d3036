"""Atomic file and folder writes.

Every artefact lmforge writes (tokenizers, token files, checkpoints) either appears
whole or not at all: a crash or Ctrl-C mid-write must never leave a half-written
file where a reader would take it for a good one.

Files: `atomic_file` (a temp file, fsynced, renamed over the target). Folders:
`atomic_dir` (a hidden temp sibling, every file and folder in it fsynced, then renamed
or atomically exchanged into place; leftovers of a crash are repaired by the next write,
`recover_leftovers`), and `atomic_output_dir` on top of it for user-named outputs.

Owners: `lock_folder` makes one process the only writer of a folder (an OS lock on
`.lock` inside it, which the system drops when the process ends, however it ends).

Permissions: what lands gets the mode any new file or folder gets under the user's umask
(0644 and 0755 with umask 022), not the private 0600 of a temporary file, so another user
or a server process can read a model the umask lets them read (`umask`, `new_file_mode`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.errors import LmforgeError

try:
    import fcntl
except ImportError:  # Windows: folder locks are a no-op there (see `lock_folder`)
    fcntl = None  # type: ignore[assignment]


def _umask_from_proc() -> int | None:
    """The umask from /proc/self/status (Linux 4.7+), read without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """The umask when lmforge.io was imported. `os.umask` only reads it by setting it: done
    once here, while importing, and put back at once (a thread creating a file in between
    would get mode 022 instead of the user's), never again later while threads may run."""
    mask = _umask_from_proc()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def umask() -> int:
    """The process's umask now (from /proc where the system has it, so a change after
    import counts), else as it was when lmforge.io was imported; never changes it."""
    mask = _umask_from_proc()
    return _IMPORT_UMASK if mask is None else mask


def new_file_mode() -> int:
    """The mode a new file gets from `open()`: 0o666 less the umask (0644 with umask 022)."""
    return 0o666 & ~umask()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a file opened for binary writing that becomes `path` only if the block succeeds.

    It is a temporary file in the same folder, fsynced and renamed over `path` at the
    end; on any exception (a failed check inside the block included) it is deleted.
    The file lands with the mode a new file gets under the umask (`new_file_mode`), not
    the 0600 mkstemp gives its temporary files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _set_mode(fd, tmp, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _set_mode(fd: int, path: str, mode: int) -> None:
    """chmod an open file (by its descriptor where the system can, else by its name)."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows before Python 3.13: only the read-only bit means anything there
        os.chmod(path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- folders ----------------------------------------------------------------------------
# A folder is written whole or not at all by building it in a hidden sibling and renaming
# it into place. Every hidden name is `.{target}.{kind}-{token}`:
#   tmp  the folder being built (or, after an atomic exchange, the old one being deleted);
#   old  the previous folder moved aside while the new one is renamed in (only on systems
#        that cannot exchange two folders in one step);
#   del  a folder hidden before it is deleted, so a crash mid-delete leaves nothing that
#        looks like the real one.
# An `old` one is only ever a whole folder that had landed (it is renamed to `del` before
# it is deleted), so when its target is missing, the swap it was part of never finished
# and putting it back restores the folder as it was. The rest are always garbage.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)(?P<token>-[\w-]*)?")
_MKDTEMP = re.compile(r"(?P<name>.+)\.\w{8}")  # `.{out}.XXXXXXXX.tmp`: mkdtemp's name in the earlier atomic_output_dir


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _hidden(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{_token()}")


def _parse_leftover(name: str, is_dir: bool) -> tuple[str, str] | None:
    """(target name, kind) of a hidden entry an interrupted folder write or delete left,
    None for anything else. Temp folders are folders; a file is ours only under a name
    that nothing else in lmforge uses (`atomic_file`'s temp files end in `.tmp`)."""
    m = _LEFTOVER.fullmatch(name)
    if m is None:
        return None
    target, kind = m["name"], m["kind"]
    if m["token"] is None:  # `.{out}.old` / `.{out}.XXXXXXXX.tmp` of the earlier atomic_output_dir
        if not is_dir:
            return None
        if kind == "tmp" and (legacy := _MKDTEMP.fullmatch(target)):
            target = legacy["name"]
    elif kind == "tmp" and not is_dir:
        return None
    return target, kind


def _remove(path: Path) -> None:
    """Delete a folder (or a file) as far as possible; what is left stays hidden."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder (or a file): hidden first (`.{name}.del-*`), then removed, so a crash
    mid-delete never leaves a partial folder under its real name; the next folder write
    beside it removes what is left."""
    _hide_and_remove(Path(path), Path(path))


def _hide_and_remove(path: Path, target: Path) -> None:
    """Rename `path` to a `del` name of `target` (the folder it was or stood in for, so
    the next repair of `target` finds it), then delete it."""
    hidden = _hidden(target, "del")
    try:
        os.replace(path, hidden)
    except FileNotFoundError:
        return
    except OSError:
        hidden = path  # cannot rename (e.g. a folder in use on Windows): delete in place
    _remove(hidden)


def recover_leftovers(parent: str | os.PathLike, target: str | Callable[[str], bool]) -> None:
    """Repair what interrupted writes and deletes of the folders `target` names (a name,
    or a test on names) left in `parent`: an `old` folder whose target is missing is put
    back (the new one never landed); every other leftover is removed.

    One writer per target: a temp folder of a write still running elsewhere is taken for
    a leftover of a crash.
    """
    parent = Path(parent)
    wanted = (lambda name: name == target) if isinstance(target, str) else target
    try:
        entries = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    changed = False
    for p in entries:
        parsed = _parse_leftover(p.name, p.is_dir() and not p.is_symlink())
        if parsed is None or not wanted(parsed[0]):
            continue
        name, kind = parsed
        changed = True
        dest = parent / name
        if kind == "old" and not os.path.lexists(dest):
            with contextlib.suppress(OSError):  # if it cannot go back, keep it hidden: it may be the only copy
                os.replace(p, dest)
        elif kind == "old":
            _hide_and_remove(p, dest)  # an `old` one must never be partial
        else:
            _remove(p)
    if changed:
        fsync_dir(parent)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Put every regular file under `root` on disk, then every folder, deepest first, so
    each folder's entries name files that are already durable. Symlinks are not followed
    (what they point to is not part of the folder). A file that cannot be synced raises:
    its content may not be on disk."""
    folders = []
    for dirpath, _dirnames, filenames in os.walk(root):
        folders.append(dirpath)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _fsync_file(path)
    for folder in reversed(folders):  # os.walk lists a folder before anything inside it
        fsync_dir(Path(folder))


def give_umask_modes(root: str | os.PathLike) -> None:
    """Give every file and folder under `root` the mode a new one gets under the umask
    (files 0o666, or 0o777 when the owner may run them, and folders 0o777, less the umask).
    Writers that go through a temporary file (safetensors' `save_file`, `atomic_file`'s
    mkstemp) leave it private (0600): a model folder must be readable by whoever the
    user's umask lets read it. Symlinks are left alone."""
    mask = umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        _chmod_bits(dirpath, os.lstat(dirpath).st_mode, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                _chmod_bits(path, st.st_mode, (0o777 if st.st_mode & stat.S_IXUSR else 0o666) & ~mask)


def _chmod_bits(path: str, mode: int, want: int) -> None:
    """Set the rwx bits of `path` to `want`, keeping setuid/setgid/sticky (a folder's setgid
    makes what is created in it take the folder's group: it stays)."""
    if mode & 0o777 != want:
        os.chmod(path, (stat.S_IMODE(mode) & 0o7000) | want)


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot, and nothing has changed then."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _make_dirs(folder: Path) -> None:
    """`mkdir -p`, each new folder made durable in its parent: a folder renamed into a
    folder that a crash then loses is lost with it."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for f in reversed(missing):
        with contextlib.suppress(FileExistsError):
            f.mkdir()
        fsync_dir(f.parent)


def _new_temp(out: Path) -> Path:
    """An empty hidden sibling of `out`. Not mkdtemp: its folders are private (0700), and
    the folder becomes `out`, which should get the permissions any new folder gets."""
    while True:
        tmp = _hidden(out, "tmp")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _swap_in(tmp: Path, out: Path) -> None:
    """Make the finished folder `tmp` be `out`, replacing whatever is there. A crash at any
    moment leaves `out` old and whole or new and whole (or, between the two renames of the
    fallback, the old one under a hidden `old` name that `recover_leftovers` puts back)."""
    parent = out.parent
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_dir(parent)
        return
    if _exchange(tmp, out):
        fsync_dir(parent)  # the new one is in place for good before the old one goes
        _remove(tmp)  # now the old folder, under the hidden temp name
        return
    old = _hidden(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):  # an error, not a crash: put the old one back now
            os.replace(old, out)
        raise
    fsync_dir(parent)
    _hide_and_remove(old, out)  # an `old` one must never be partial


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside `out`; when the block succeeds it becomes `out`,
    replacing any folder (or file) there, in one atomic step where the system can.

    Before it is renamed, every file and folder in it is fsynced, so what lands is on
    disk, not just in the page cache. On any exception (KeyboardInterrupt included) the
    temporary folder is removed and `out` is left as it was; after a hard crash, the next
    `atomic_dir` (or `recover_leftovers`) for `out` cleans up or restores what was left.
    Missing parent folders are created. Everything in it lands with the modes new files
    and folders get under the umask (`give_umask_modes`).
    """
    out = Path(out)
    _make_dirs(out.parent)
    recover_leftovers(out.parent, out.name)
    tmp = _new_temp(out)
    try:
        yield tmp
        give_umask_modes(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_dir` for a user-named output folder: an existing `out` is replaced only with
    `overwrite`, checked before anything is written so a refused run costs nothing."""
    out = Path(out)
    recover_leftovers(out.parent, out.name)  # a swap a crash interrupted: `out` is its old self again
    if os.path.lexists(out) and not overwrite:
        raise LmforgeError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    with atomic_dir(out) as tmp:
        yield tmp


# --- folder locks -----------------------------------------------------------------------
# One writer per folder: `flock` on `FOLDER/.lock`, which records the owner. The kernel
# drops the lock when its process ends (a SIGKILL included), so a lock is never stale; the
# file itself stays (deleting it would let two processes lock two different files).
LOCK_FILE = ".lock"


class FolderLock:
    """A folder this process owns until `release()` (or the end of a `with` block)."""

    def __init__(self, path: Path, key: tuple[int, int] | None) -> None:
        self.path, self._key, self._released = path, key, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._key is None:
            return
        with _LOCKS_GUARD:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del _HELD[self._key]
                fd, _, made = held
                if made and _only_the_lock(self.path):
                    shutil.rmtree(self.path, ignore_errors=True)  # made for a run that wrote nothing: gone again
                os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# the folder's (device, inode) -> [lock fd, holders in this process, whether the lock made the folder]
_HELD: dict[tuple[int, int], list] = {}
_LOCKS_GUARD = threading.Lock()


def _forget_locks_in_child() -> None:
    """A forked child (a tokenizer worker) must not keep its parent's folders locked after
    the parent dies, nor think it owns them: close its copies of the lock descriptors."""
    for fd, *_ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def folder_owner(path: str | os.PathLike) -> dict[str, Any]:
    """What `.lock` in `path` says about the process that owns (or last owned) it: pid,
    host, command, since; empty when there is no such record."""
    try:
        owner = json.loads((Path(path) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not isinstance(owner.get("pid"), int):
        return "another process"
    details = [str(owner["command"])] if owner.get("command") else []
    if owner.get("host") and owner["host"] != socket.gethostname():
        details.append(f"on host {owner['host']}")
    if isinstance(owner.get("since"), (int, float)):
        details.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"])))
    return f"process {owner['pid']}" + (f" ({', '.join(details)})" if details else "")


def lock_folder(path: str | os.PathLike, *, what: str = "folder", fix: str = "wait for it to finish or stop it") -> FolderLock:
    """Make this process the one writer of the folder `path` (created if missing) until
    the returned lock is released or the process ends, however it ends. A folder the
    lock made and nothing but the lock file went into is removed on release.

    Another process holding it: `LmforgeError` "{what} PATH is in use by process PID
    (...); {fix}". The same process locking it again shares the lock (a recipe that
    holds a folder may call another that locks it too); it is released with the last
    holder. Locks are advisory `flock`s: every lmforge writer takes them, nothing else
    has to. On Windows (no `fcntl`) this is a no-op: nothing stops a second writer there.
    """
    path = Path(path)
    made = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LmforgeError(f"{what} {path} is not a folder (a file is in the way); choose another path") from None
    if fcntl is None:
        return FolderLock(path, None)
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    with _LOCKS_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return FolderLock(path, key)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LmforgeError(f"{what} {path} is in use by {_describe(folder_owner(path))}; {fix}") from None
        except OSError as e:
            os.close(fd)
            raise LmforgeError(f"cannot lock {what} {path} ({e.strerror}): its file system takes no file locks; "
                               "use a folder on a local disk") from None
        try:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "since": round(time.time(), 3)}
            data = (json.dumps(record) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        _HELD[key] = [fd, 1, made]
        return FolderLock(path, key)


def _only_the_lock(path: Path) -> bool:
    try:
        return {p.name for p in path.iterdir()} == {LOCK_FILE}
    except OSError:
        return False


def _command() -> str:
    """This process's command line, short: `lmforge pretrain --out runs/x ...`."""
    argv = list(sys.argv)
    if argv and ("lmforge" in (Path(argv[0]).name, Path(argv[0]).parent.name if argv[0].endswith("__main__.py") else "")):
        argv[0] = "lmforge"
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:197] + "..."


def read_jsonl_objects(path: str | os.PathLike, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file of objects. A line that is
    not JSON, not an object, or not UTF-8 is an error naming the file and line; `kind` says
    what the file should be ("a responses.jsonl"), for the message."""
    with open(path, encoding="utf-8") as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path} line {n} is not JSON ({e.msg}): {kind} holds one JSON object a line") from None
                if not isinstance(row, dict):
                    raise LmforgeError(f"{path} line {n} is a JSON {type(row).__name__}, not an object: {kind} holds one a line")
                yield n, row
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{path} line {n + 1} is not UTF-8 text ({e.reason}): give {kind}") from None
