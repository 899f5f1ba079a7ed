"""Output safety: one writer per destination, atomic replacement, checked paths and space.

Every moeify writer (checkpoint directories, ``--format hf``, ``distill``, ONNX files)
goes through this module:

- `claim_output(out, ...)`: the one check of a destination (`check_output`, then,
  under its lock, that it still does not exist and that the predicted bytes fit),
  holding `output_lock` until released. A claim inside a claim of the same destination
  by this process checks nothing again (the space of its own ``need`` aside), so a
  caller can claim before any work and the writer again around the write.
- `output_lock(out)`: an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside ``out``,
  held for the whole write (a second writer to the same destination fails at once:
  "``out`` is being written by moeify (pid N)"). Re-entrant within a process. The lock
  file holds the owner's pid and is removed on release.
- `atomic_directory` / `atomic_file`: the output is assembled under
  ``.NAME.tmp-PID-xxxx`` beside the destination and renamed into place only when
  complete; on any failure the temporary is removed and the previous output stays.
  Temporaries left by a process that no longer runs (SIGKILL, power loss) are removed
  by the next write to that destination, with one line on stderr; live ones are left.
- Outputs get the user's umask (``tempfile.mkdtemp`` creates 0700 directories).
- `check_output`: an empty destination, ``.``, the current directory or one of its
  parents, and an output equal to, inside or containing an input are refused before any
  work; so is a destination whose parent is a file or is not writable.
- `check_free_space`: predicted bytes against the free space where the output goes.
- `output_error`: an ``OSError`` met while writing (no space, read-only file system,
  permission denied) as one `MoEError` line naming the path and the fix.

A refusal names the destination as the caller named it: each function takes ``what``,
the `Param` of the destination (``path`` in ``moeify.save(model, path)``, ``--out`` on
the command line; `DESTINATION` by default), and a refused existing output suggests
``force=True`` in Python and ``--force`` on the command line (`moeify.errors`).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moeify.errors import MoEError, Param

GiB = 2**30
# the destination a writer is given: ``path`` in Python (``moeify.save(model, path)``), ``--out``
# on the command line; writers whose destination is named otherwise pass their own
DESTINATION = Param("path", "--out")
FORCE = Param("force").given(True)


def size_text(n: int | float) -> str:
    """Bytes for a message: ``2.0 MiB``, ``25.3 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def umask() -> int:
    """The process umask, read without changing it where the kernel tells it."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux: the classic read-and-restore
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes the user's umask gives new
    files: directories ``0o777 & ~umask``, files ``0o666 & ~umask``."""
    mask = umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# --- paths ---------------------------------------------------------------------------------


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _destination(path: str | os.PathLike) -> Path:
    """The absolute path of the entry a writer replaces: its parent resolved, its own
    name kept (a symbolic link is replaced, not followed)."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    return path.parent.resolve() / path.name


def _inside(path: Path, parent: Path) -> bool:
    return path != parent and path.is_relative_to(parent)


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = _resolved(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    force: bool = False,
    what: Param = DESTINATION,
    inside_ok: bool = False,
) -> Path:
    """Refuse an output path before any work (see the module docs); returns it resolved.

    ``what``: the parameter that names ``out``, as messages spell it. ``inputs``: local paths the command reads (a source directory, a checkpoint); names
    that are not local paths (hub ids, presets, factories) are ignored. ``inside_ok``:
    an output inside an input is allowed (an ONNX file beside a checkpoint's shards)
    unless it would replace one of the input's files.
    """
    text = os.fspath(out)
    given = what.given(text)
    if not text.strip():
        raise MoEError("{what} is empty: name the output, e.g. {example}", what=what,
                       example=what.given("./moe"))
    if Path(text).name in ("", ".", ".."):
        raise MoEError("{given!r} names a directory by '.' or '..', not a new output: name the "
                       "output itself, e.g. {example}", given=given,
                       example=what.given(os.path.join(text, "moe")))
    target = _resolved(text)
    try:
        cwd = _resolved(os.getcwd())
    except OSError:  # the current directory is gone: nothing to protect there
        cwd = None
    if cwd is not None and (target == cwd or _inside(cwd, target)):
        raise MoEError("{given} is the current directory or contains it: writing it would "
                       "replace the directory you are in; choose another {what}", given=given,
                       what=what)
    for ref in inputs:
        if ref is None or not os.fspath(ref) or not os.path.lexists(os.fspath(ref)):
            continue
        source, names = _resolved(ref), {"given": given, "what": what, "input": os.fspath(ref)}
        if target == source:
            raise MoEError("{given} is the input {input} itself: writing it would destroy what "
                           "is being read; choose another {what}", **names)
        if _inside(source, target):
            raise MoEError("{given} contains the input {input}: replacing it would destroy "
                           "what is being read; choose another {what}", **names)
        if _inside(target, source):
            if not inside_ok:
                raise MoEError("{given} is inside the input {input}: choose a {what} outside "
                               "it", **names)
            if target.exists() and not target.suffix == ".onnx" and not target.name.endswith(".onnx.data"):
                raise MoEError("{given} would replace {name}, a file of the input {input}; "
                               "choose another {what}", name=target.name, **names)
    if os.path.lexists(target) and not force:
        raise _exists(text, what)
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MoEError("cannot create {text}: {parent} is a file, not a directory; choose "
                       "another {what}", text=text, parent=parent, what=what)
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = _read_only(parent)
        reason = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise MoEError("cannot write {text}: {parent} {reason}; choose another {what}", text=text,
                       parent=parent, reason=reason, what=what)
    return target


def _exists(out: str | os.PathLike, what: Param) -> MoEError:
    """The refusal of an output that exists: choose another, or force its replacement."""
    return MoEError("{out} already exists: choose another {what} or pass {force}",
                    out=os.fspath(out), what=what, force=FORCE)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:  # pragma: no cover
        return False


def check_free_space(out: str | os.PathLike, need: int, *, what: Param = DESTINATION) -> None:
    """Refuse to write ``need`` bytes at ``out`` when its file system has less free."""
    if not need:
        return
    where = nearest_existing(Path(out))
    try:
        free = shutil.disk_usage(where).free
    except OSError:  # pragma: no cover - nothing to compare with
        return
    if need > free:
        raise MoEError("writing {out} needs about {need_text} ({need:,} bytes), but {where} has "
                       "{free_text} ({free:,} bytes) free: free space or choose another {what}",
                       out=os.fspath(out), need_text=size_text(need), need=need, where=where,
                       free_text=size_text(free), free=free, what=what)


# --- errors --------------------------------------------------------------------------------

_NO_SPACE = re.compile(r"No space left on device|StorageFull|os error 28|ENOSPC", re.I)


def output_error(error: BaseException, out: str | os.PathLike, *, what: Param = DESTINATION,
                 need: int | None = None) -> MoEError | None:
    """A write failure as one `MoEError` line (path and fix), or None if ``error`` is not
    a file-system failure. Also recognizes the Rust I/O errors safetensors raises."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None and _NO_SPACE.search(str(error)):
        code = errno.ENOSPC
    if code is None:
        return None
    out = os.fspath(out)
    name = getattr(error, "filename", None)
    file = f" while writing {Path(name).name}" if name else ""
    where = nearest_existing(Path(out).parent)
    names = {"out": out, "where": where, "what": what}
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = shutil.disk_usage(where).free
        except OSError:  # pragma: no cover
            free = 0
        need_text = f"; it needs about {size_text(need)}" if need else ""
        return MoEError("no space left on {where}{file} ({free} free{need_text}): free space or "
                        "choose another {what}; {out} was not changed", file=file,
                        free=size_text(free), need_text=need_text, **names)
    if code == errno.EROFS:
        return MoEError("cannot write {out}: {where} is on a read-only file system; choose "
                        "another {what}", **names)
    if code in (errno.EACCES, errno.EPERM):
        return MoEError("cannot write {out}: permission denied ({denied}); choose another "
                        "{what} or fix its permissions", denied=name or where, **names)
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = nearest_existing(Path(out).parent)
        if not blocker.is_dir():
            return MoEError("cannot create {out}: {blocker} is a file, not a directory; choose "
                            "another {what}", blocker=blocker, **names)
    if code in (errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EMLINK,
                errno.ENOTEMPTY):
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return MoEError("cannot write {out}: {reason}{file}; choose another {what}",
                        reason=reason, file=f" ({name})" if name else "", **names)
    return None  # any other error (from reading the input, say) keeps its own form


# --- locks ---------------------------------------------------------------------------------

_held: dict[Path, list] = {}  # lock path -> [fd, depth], this process's locks


def lock_path(out: str | os.PathLike) -> Path:
    target = _destination(out)
    return target.with_name(f".{target.name}.lock")


class output_lock:
    """``with output_lock(out):`` hold the exclusive write lock of destination ``out``.

    Fails at once with `MoEError` naming the holder's pid when another process holds it.
    Creates the destination's parent directories (the lock file lives there).
    Re-entrant within one process. Also removes temporaries of dead writers (see
    `remove_stale`) once the lock is held.
    """

    def __init__(self, out: str | os.PathLike, *, what: Param = DESTINATION) -> None:
        self.out, self.what = out, what
        self.path = lock_path(out)

    @property
    def held(self) -> bool:
        """This process holds the lock (through this object or another)."""
        return self.path in _held

    def __enter__(self) -> output_lock:
        held = _held.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._acquire()
        except OSError as error:
            raise output_error(error, self.out, what=self.what) or error from None
        _held[self.path] = [fd, 1]
        remove_stale(self.out)
        return self

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = os.read(fd, 32).decode().strip()
                finally:
                    os.close(fd)
                if not pid:  # its holder took it an instant ago and is writing its pid
                    time.sleep(0.001)
                    continue
                raise MoEError("{out} is being written by moeify (pid {pid}); wait for it or "
                               "choose another {what}", out=os.fspath(self.out), pid=pid,
                               what=self.what) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the file may have been removed by its previous holder: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def __exit__(self, *exc) -> None:
        held = _held[self.path]
        held[1] -= 1
        if held[1]:
            return
        del _held[self.path]
        try:
            os.unlink(self.path)  # while still locked: the next writer re-checks the inode
        except OSError:
            pass
        os.close(held[0])


_command_scope: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "moeify_command_scope", default=None)


@contextlib.contextmanager
def command_scope():
    """The span of one CLI command: claims taken with `hold_output` inside it are
    released (their lock files removed) when it ends, whatever the outcome."""
    with contextlib.ExitStack() as stack:
        token = _command_scope.set(stack)
        try:
            yield
        finally:
            _command_scope.reset(token)


class claim_output:
    """``with claim_output(out, inputs=..., force=..., need=...):`` check destination
    ``out`` once and hold its lock until the block ends.

    The outermost claim of ``out`` in this process runs `check_output` (``inputs``,
    ``force``, ``what`` and ``inside_ok`` as there), takes `output_lock`, refuses an
    ``out`` that appeared meanwhile (unless ``force``) and checks ``need`` bytes
    against the free space. A claim nested in it only checks its own ``need``: the
    destination was checked, and no other writer can have touched it since.
    """

    def __init__(self, out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 force: bool = False, need: int = 0, what: Param = DESTINATION,
                 inside_ok: bool = False) -> None:
        self.out, self.inputs, self.force, self.need = out, inputs, force, need
        self.what, self.inside_ok = what, inside_ok
        self.lock = output_lock(out, what=what)

    def __enter__(self) -> claim_output:
        outermost = not self.lock.held
        if outermost:
            check_output(self.out, inputs=self.inputs, force=self.force, what=self.what,
                         inside_ok=self.inside_ok)
        self.lock.__enter__()
        try:
            if outermost and not self.force:  # again, now that no one else can be writing it
                refuse_existing(Path(self.out), what=self.what)
            check_free_space(self.out, self.need, what=self.what)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)


def hold_output(out: str | os.PathLike, **claim: Any) -> None:
    """`claim_output` for the rest of the running command (`command_scope`): one line at
    the top of a command, before any work. Outside a scope the claim lasts until the
    process ends."""
    held = claim_output(out, **claim)
    stack = _command_scope.get()
    if stack is None:
        held.__enter__()
    else:
        stack.enter_context(held)


# --- temporaries ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a zombie has stopped writing
    except (OSError, IndexError):
        return True


def temp_name(out: Path, kind: str = "tmp") -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def remove_stale(out: str | os.PathLike) -> None:
    """Remove the temporaries (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) that writers of
    ``out`` left when they were killed; one line on stderr for each. Those of running
    processes are left alone."""
    target = _destination(out)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = match.group(1)
        if _alive(int(pid)):
            continue
        if ".old-" in entry.name[len(target.name) + 1:] and not os.path.lexists(target):
            # killed between moving the previous output aside and renaming the new one
            # into place: the previous output is the one to keep
            try:
                os.replace(entry, target)
            except OSError:
                pass
            else:
                print(f"moeify: restored {target} from {entry.name}, left by an interrupted "
                      f"write (pid {pid} is gone)", file=sys.stderr)
                continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as error:
            print(f"moeify: cannot remove {entry}, left by an interrupted write (pid {pid}): "
                  f"{error.strerror}; remove it with: rm -r '{entry}'", file=sys.stderr)
            continue
        print(f"moeify: removed {entry}, left by an interrupted write (pid {pid} is gone)",
              file=sys.stderr)


def refuse_existing(out: Path, *, what: Param = DESTINATION) -> None:
    """Raise `MoEError` if ``out`` exists (outputs are replaced only with ``force``)."""
    if os.path.lexists(out):
        raise _exists(out, what)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


class atomic_directory:
    """``with atomic_directory(out, force=...) as tmp:`` build ``tmp``, renamed to ``out``
    on success; removed on failure (see the module docs).

    The destination is claimed (`claim_output`: an existing ``out`` refused without
    ``force``; ``need``, the predicted bytes, checked against the free space) from entry
    to the final rename, and replaced only after the new one is complete; an ``OSError``
    of the write becomes one `MoEError` line (`output_error`).
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False, need: int | None = None,
                 what: Param = DESTINATION) -> None:
        self.out = Path(out)
        self.force, self.need, self.what = force, need, what
        self.claim = claim_output(out, force=force, need=need or 0, what=what)

    def __enter__(self) -> Path:
        self.claim.__enter__()
        try:
            self.tmp = self._make()
        except BaseException as error:
            self.claim.__exit__(None, None, None)
            if isinstance(error, OSError):
                raise output_error(error, self.out, what=self.what) or error from None
            raise
        return self.tmp

    def _make(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=temp_name(self.out), dir=self.out.parent))

    def __exit__(self, kind, error, tb) -> None:
        try:
            if kind is None:
                try:
                    self._commit()
                except OSError as failure:
                    _remove(self.tmp)
                    raise output_error(failure, self.out, what=self.what,
                                       need=self.need) or failure from None
                return
            _remove(self.tmp)
            mapped = output_error(error, self.out, what=self.what, need=self.need)
            if mapped is not None and isinstance(error, Exception):
                raise mapped from None
        finally:
            self.claim.__exit__(None, None, None)

    def _commit(self) -> None:
        apply_umask(self.tmp)
        backup = None
        if os.path.lexists(self.out):
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, backup)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if backup is not None:
                os.replace(backup, self.out)
            raise
        if backup is not None:
            _remove(backup)


class atomic_file(atomic_directory):
    """``with atomic_file(path, force=...) as tmp:`` write ``tmp / path.name`` (and any
    companion files, e.g. ONNX external data, beside it in ``tmp``); on success the
    companions are moved beside ``path`` first and ``path`` last, so the file never
    points at missing data. ``tmp`` is a private directory removed in every case."""

    def _commit(self) -> None:
        main = self.tmp / self.out.name
        if not main.exists():
            raise MoEError(f"nothing was written to {self.out}")  # pragma: no cover
        entries = sorted(self.tmp.iterdir(), key=lambda p: p == main)
        for entry in entries:
            apply_umask(entry)
            os.replace(entry, self.out.with_name(entry.name))
        _remove(self.tmp)
