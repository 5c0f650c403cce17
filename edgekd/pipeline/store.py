"""Atomic writes, content digests, the run-directory lock and the content-addressed stage store.
No ML library is imported here."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd.errors import LockedError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunLock:
    """An exclusive lock on a run directory; a second build on the same directory is refused, not interleaved."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"run directory {self.path.parent} is in use by another build (pid {holder}); "
                              f"wait for it to finish or pass another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------- the stage store

ENTRY_MANIFEST = "manifest.json"


@dataclass
class StoreEntry:
    stage: str
    key: str
    path: Path
    size: int  # bytes of its files (hard links to the run dir's current slots counted here)
    last_used: float  # the entry folder's mtime, touched on every use


class StageStore:
    """Content-addressed stage outputs: `<root>/<stage>/<key>/` holds the files and manifest of one finished run of
    a stage, like a build cache.

    An entry appears by a single rename of a complete folder, so a reader sees it whole or not at all, and a
    writer killed half-way leaves only a dot-named temporary folder that no reader looks at. Every entry is
    verified (file digests against its manifest) before it is used, so a damaged one is dropped, never read back.
    Two writers of one key: the later rename replaces the earlier entry whole. Files are hard links where the file
    system allows (entry and run-dir slot share the bytes), else copies.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> tuple[dict | None, str]:
        """The entry's manifest if it is present and intact, else (None, why not: "missing" or the damage)."""
        entry = self.entry_dir(stage, key)
        manifest = read_json(entry / ENTRY_MANIFEST)
        if not isinstance(manifest, dict):
            return None, "missing" if not entry.exists() else "its manifest is unreadable"
        if manifest.get("key") != key or not isinstance(manifest.get("digests"), dict):
            return None, "its manifest is for another key"
        for file, digest in manifest["digests"].items():
            path = entry / file
            if not path.is_file():
                return None, f"file {file} is gone"
            if sha256_file(path) != digest:
                return None, f"file {file} was modified or corrupted (digest mismatch)"
        return manifest, ""

    def publish(self, stage: str, key: str, src: Path) -> None:
        """Put the finished stage folder `src` (files + manifest) into the store under `key`."""
        final = self.entry_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers(final.parent)
        tmp = final.parent / f".{key}.tmp-{_unique()}"
        try:
            link_tree(src, tmp)
            self._swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def materialize(self, stage: str, key: str, dest: Path) -> None:
        """A copy (hard links) of the entry at `dest`, which must not exist yet."""
        link_tree(self.entry_dir(stage, key), dest)
        self.touch(stage, key)

    def touch(self, stage: str, key: str) -> None:
        """Mark the entry used now (least-recently-used eviction). Only the folder's mtime changes, no file."""
        try:
            os.utime(self.entry_dir(stage, key))
        except OSError:
            pass

    def discard(self, stage: str, key: str) -> None:
        entry = self.entry_dir(stage, key)
        doomed = entry.parent / f".{key}.old-{_unique()}"
        try:
            os.replace(entry, doomed)  # gone for readers at once; deleting the files may take longer
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def entries(self) -> list[StoreEntry]:
        found = []
        for stage_dir in sorted(p for p in self.root.glob("*") if p.is_dir() and not p.name.startswith(".")):
            for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                found.append(StoreEntry(stage_dir.name, entry.name, entry, size, entry.stat().st_mtime))
        return found

    def size(self) -> int:
        """Bytes the store holds, each file counted once however many hard links it has."""
        seen: dict[tuple[int, int], int] = {}
        for f in self.root.rglob("*"):
            if f.is_file():
                st = f.stat()
                seen[(st.st_dev, st.st_ino)] = st.st_size
        return sum(seen.values())

    def prune(self, max_bytes: int, keep: set[tuple[str, str]]) -> list[StoreEntry]:
        """Remove entries, least recently used first, until the store holds at most `max_bytes`; entries in `keep`
        (what the run dir uses now) stay. Also clears the leftovers of killed writers. Returns what was removed."""
        for stage_dir in (p for p in self.root.glob("*") if p.is_dir()):
            self._remove_leftovers(stage_dir)
        removed = []
        candidates = sorted((e for e in self.entries() if (e.stage, e.key) not in keep), key=lambda e: e.last_used)
        total = self.size()
        for entry in candidates:
            if total <= max_bytes:
                break
            before = total
            self.discard(entry.stage, entry.key)
            total = self.size()
            removed.append(dataclasses.replace(entry, size=before - total))
        return removed

    @staticmethod
    def _swap_in(tmp: Path, final: Path) -> None:
        """Rename the complete `tmp` to `final`; an existing entry (a forced rerun of the same key) is moved aside
        first and deleted after, so `final` is never a mix of the two."""
        old = final.parent / f".{final.name}.old-{_unique()}"
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer put this key in first: its entry is as good
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _remove_leftovers(stage_dir: Path) -> None:
        remove_dead_leftovers(stage_dir)


_LEFTOVER = re.compile(r"^\..*\.(tmp|old)-(\d+)(-\d+)?$")


def remove_dead_leftovers(folder: Path) -> None:
    """Temporary folders (`.NAME.tmp-PID[-N]`, `.NAME.old-PID[-N]`) of writers that no longer run: a killed build's."""
    for p in folder.glob(".*"):
        match = _LEFTOVER.match(p.name)
        if match and int(match.group(2)) != os.getpid() and not _alive(int(match.group(2))):
            shutil.rmtree(p, ignore_errors=True)


_COUNTER = [0]


def _unique() -> str:
    _COUNTER[0] += 1
    return f"{os.getpid()}-{_COUNTER[0]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def link_tree(src: Path, dest: Path) -> None:
    """`dest` as a copy of the folder `src`: files hard-linked (no bytes copied), copied where linking fails
    (a file system without hard links)."""
    def link_or_copy(s: str, d: str) -> str:
        try:
            os.link(s, d)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            shutil.copy2(s, d)
        return d

    shutil.copytree(src, dest, copy_function=link_or_copy)


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GB', '0', '12345' -> bytes (powers of 1024); ValueError when it is not a size."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    value = float(number)  # ValueError for anything else
    if not (value >= 0 and value != float("inf")):
        raise ValueError(text)
    return int(value * units[unit])


def format_size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
