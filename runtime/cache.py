"""The on-disk kernel and config cache.

Layout under the cache root (`settings().cache_dir` unless given):

    entries/<key>/           one entry per cache key, complete or absent
        <name>.py            generated sources, readable as written
        meta.json            spec name, key parts, created time, attnc version, sha256 per source
        configs.json         tuned configs: {device: {shape bucket: config}}; optional, mutable
    locks/<key>.lock         one file lock per key, held while building or changing the entry
    tmp/                     staging area on the same file system, so renames are atomic

An entry is built in `tmp/` and renamed into place, so readers never see half of one.
Entries are verified on every load; a corrupt one is logged and rebuilt, never trusted,
and one written by another attnc version is never loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from filelock import FileLock

from .settings import settings

log = logging.getLogger("attnc")

KEY_FORMAT = 1  # bump when the canonical serialisation in `cache_key` changes
ENTRY_FORMAT = 1  # bump when the layout of meta.json changes
META_FILE = "meta.json"
CONFIGS_FILE = "configs.json"
RESERVED_PARTS = ("spec", "attnc", "compiler", "triton", "torch", "device")

# Import reads an archive into memory before writing anything; these bound what a
# hostile archive can make it read.
MAX_IMPORT_FILE_BYTES = 64 << 20
MAX_IMPORT_BYTES = 512 << 20
# Staging directories younger than this may belong to a build in progress elsewhere.
STAGING_GRACE_SECONDS = 3600

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class CacheError(Exception):
    """A cache request that cannot be met: unknown key, rejected archive, ..."""


# --- keys --------------------------------------------------------------------------


def cache_key(parts: Mapping[str, str]) -> str:
    """Hex sha256 over a canonical serialisation of the named key parts.

    Parts must be strings on both sides, so that `1` and `"1"` cannot silently hash
    alike in one caller and differently in another.
    """
    for name, value in parts.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"cache key part {name!r}: names and values must be str, "
                            f"got {type(name).__name__} -> {type(value).__name__}")
    canonical = json.dumps({"format": KEY_FORMAT, "parts": dict(parts)}, sort_keys=True,
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def standard_key_parts(spec_text: str, templates: Mapping[str, str], device: str,
                       extra: Mapping[str, str]) -> dict[str, str]:
    """Key parts with everything that changes generated code filled in for the caller.

    `spec_text`: the canonical IR text; `templates`: name -> template text (hashed here);
    `device`: see `describe_device`; `extra`: dtypes and specialised constants. Adds the
    attnc, Triton and torch versions and a hash of the compiler's own sources, so a
    change to codegen misses the cache even when the version string stays put.
    """
    import torch

    parts = {
        "spec": spec_text,
        "attnc": attnc_version(),
        "compiler": compiler_fingerprint(),
        "triton": _triton_version(),
        "torch": torch.__version__,
        "device": device,
    }
    for name, text in templates.items():
        parts[f"template:{name}"] = _sha256(text.encode("utf-8"))
    for name, value in extra.items():
        if name in parts or name.startswith("template:"):
            raise ValueError(f"extra key part {name!r} clashes with a standard part; "
                             f"reserved: {', '.join(RESERVED_PARTS)}, template:*")
        parts[name] = value
    return parts


def attnc_version() -> str:
    from .. import __version__  # read at call time: attnc/__init__ imports this package

    return __version__


def compiler_fingerprint() -> str:
    """sha256 over the sources of attnc.dsl and attnc.codegen (code, grammar, templates).

    Recomputed on every call (a few dozen small files) rather than memoised, so that a
    long-lived process never keys new builds on code it has since replaced on disk.
    """
    digest = hashlib.sha256()
    for package in ("attnc.dsl", "attnc.codegen"):
        for rel, data in sorted(_package_sources(resources.files(package), "")):
            digest.update(f"{package}/{rel}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def describe_device(device) -> str:
    """A device's identity for cache keys and config lookups, e.g. 'cuda NVIDIA H100 sm_90'."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"cuda {props.name} sm_{props.major}{props.minor}"


def _package_sources(folder, prefix: str):
    for item in folder.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            yield from _package_sources(item, f"{prefix}{item.name}/")
        elif item.name.endswith((".py", ".jinja", ".lark")):
            yield f"{prefix}{item.name}", item.read_bytes()


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


# --- entries -----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One cache entry. `files`: source name -> path; `problem`: why it is unusable."""

    key: str
    path: Path
    files: Mapping[str, Path]
    meta: Mapping[str, Any]
    problem: str | None = None

    @property
    def spec(self) -> str:
        return str(self.meta.get("spec", "?"))

    @property
    def version(self) -> str:
        return str(self.meta.get("attnc_version", "?"))

    @property
    def stale(self) -> bool:
        """Written by another attnc version, so never loaded."""
        return self.version != attnc_version()

    @property
    def ok(self) -> bool:
        """Intact and written by this attnc version: the only kind ever loaded."""
        return self.problem is None and not self.stale

    @property
    def device(self) -> str:
        parts = self.meta.get("parts")
        return str(parts.get("device", "-")) if isinstance(parts, dict) else "-"

    @property
    def created(self) -> float:
        created = self.meta.get("created")
        return float(created) if isinstance(created, (int, float)) else self.last_used

    @property
    def last_used(self) -> float:
        """Built, loaded or retuned; the entry directory's mtime, touched on every hit."""
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def size(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        except OSError:
            return 0


@dataclass(frozen=True)
class ImportReport:
    added: tuple[str, ...]    # keys written (new, or replacing a corrupt or stale entry)
    present: tuple[str, ...]  # keys already cached intact; only their configs were merged


class KernelCache:
    """Generated sources and tuned configs on disk, keyed by `cache_key`, shared safely
    between processes. Holds no state beyond its root: every call reads the disk."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else settings().cache_dir

    def __repr__(self) -> str:
        return f"KernelCache({str(self.root)!r})"

    @property
    def entries_dir(self) -> Path:
        return self.root / "entries"

    # --- building and loading

    def get_or_build(self, key: str, parts: Mapping[str, str],
                     build: Callable[[], Mapping[str, str]], *,
                     spec_name: str | None = None) -> Entry:
        """The intact entry for `key`, building it first if needed.

        `build()` returns source name -> text and runs at most once per key across all
        processes sharing this cache; the others wait for it and load its result.
        `spec_name` labels the entry in `attnc cache list`.
        """
        _check_key(key)
        if cache_key(parts) != key:
            raise ValueError(f"cache key {key[:12]}... is not the hash of the parts given")
        entry = self._inspect(key)
        if entry is None or not entry.ok:
            with self._lock(key):
                entry = self._inspect(key)  # another process may have built it meanwhile
                if entry is None or not entry.ok:
                    if entry is not None and entry.problem:
                        log.warning("attnc cache: entry %s (%s) is corrupt: %s; rebuilding it",
                                    key, entry.spec, entry.problem)
                    elif entry is not None:
                        log.info("attnc cache: entry %s was written by attnc %s, this is %s; "
                                 "rebuilding it", key, entry.version, attnc_version())
                    entry = self._build(key, parts, build, spec_name or "?")
        with contextlib.suppress(OSError):  # a read-only shared cache still serves hits
            os.utime(entry.path)
        self._dump(entry)
        return entry

    def _build(self, key: str, parts: Mapping[str, str],
               build: Callable[[], Mapping[str, str]], spec_name: str) -> Entry:
        sources = build()
        for name, text in sources.items():
            _check_file_name(name, "build() returned a source named")
            if not isinstance(text, str):
                raise TypeError(f"build() returned {type(text).__name__} for {name!r}, not str")
        staging = self._staging_dir(key)
        try:
            hashes = {}
            for name, text in sorted(sources.items()):
                data = text.encode("utf-8")
                _write_atomic(staging / name, data)
                hashes[name] = _sha256(data)
            meta = {
                "format": ENTRY_FORMAT,
                "key": key,
                "spec": spec_name,
                "attnc_version": attnc_version(),
                "created": time.time(),
                "parts": dict(parts),
                "files": hashes,
            }
            _write_atomic(staging / META_FILE, _json_bytes(meta))
            self._install(key, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entry = self._inspect(key)
        if entry is None or entry.problem:
            raise CacheError(f"cache entry {key} is unreadable right after writing it "
                             f"({entry.problem if entry else 'missing'}); is {self.root} shared "
                             f"with a process that ignores its locks?")
        return entry

    def _inspect(self, key: str) -> Entry | None:
        path = self.entries_dir / key
        if not path.is_dir():
            return None

        def read(name: str) -> bytes | None:
            try:
                return (path / name).read_bytes()
            except FileNotFoundError:
                return None

        try:
            meta, problem = _entry_problem(key, read)
        except OSError as err:  # e.g. the entry vanished mid-read, or a permission error
            meta, problem = {}, f"unreadable ({err})"
        files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        return Entry(key=key, path=path, files={name: path / name for name in sorted(files)},
                     meta=meta, problem=problem)

    def _install(self, key: str, staging: Path) -> None:
        """Rename a complete staged entry into place (caller holds the key's lock)."""
        final = self.entries_dir / key
        final.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(final):
            self._discard(final)
        os.rename(staging, final)

    def _discard(self, path: Path) -> None:
        """Remove an entry so that it disappears at once, never half-deleted."""
        trash = self.root / "tmp" / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _staging_dir(self, key: str) -> Path:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{key[:12]}-", dir=self.root / "tmp"))

    def _lock(self, key: str) -> FileLock:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / f"{key}.lock")

    def _dump(self, entry: Entry) -> None:
        """ATTNC_DUMP_DIR: copy the entry's sources out for people to read."""
        dump_dir = settings().dump_dir
        if dump_dir is None:
            return
        target = dump_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', entry.spec)}-{entry.key[:12]}"
        try:
            for name, path in entry.files.items():
                if not (target / name).exists():
                    target.mkdir(parents=True, exist_ok=True)
                    _write_atomic(target / name, path.read_bytes())
        except OSError as err:
            log.warning("attnc cache: could not dump %s to ATTNC_DUMP_DIR=%s: %s",
                        entry.key[:12], dump_dir, err)

    # --- tuned configs

    def configs(self, key: str) -> dict[str, dict[str, Any]]:
        """All tuned configs of an entry: {device: {shape bucket: config}}."""
        _check_key(key)
        path = self.entries_dir / key / CONFIGS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        problem = _configs_problem(raw)
        if problem:
            log.warning("attnc cache: %s of entry %s is corrupt (%s); ignoring it",
                        CONFIGS_FILE, key, problem)
            return {}
        return json.loads(raw)

    def get_config(self, key: str, device: str, bucket: str) -> dict[str, Any] | None:
        return self.configs(key).get(device, {}).get(bucket)

    def put_config(self, key: str, device: str, bucket: str, config: Mapping[str, Any]) -> None:
        """Record the tuned config for one device and shape bucket of an existing entry."""
        if not isinstance(device, str) or not isinstance(bucket, str):
            raise TypeError("put_config: device and bucket must be str")
        try:
            json.dumps(dict(config))
        except (TypeError, ValueError) as err:
            raise ValueError(f"put_config: config is not JSON-serialisable: {err}") from None
        with self._lock(key):
            if not (self.entries_dir / key).is_dir():
                raise CacheError(f"no cache entry {key}; build it before storing configs")
            configs = self.configs(key)
            configs.setdefault(device, {})[bucket] = dict(config)
            _write_atomic(self.entries_dir / key / CONFIGS_FILE, _json_bytes(configs))

    # --- management: `attnc cache ...`

    def list_entries(self) -> list[Entry]:
        """Every entry, corrupt and stale ones included (see `Entry.problem`, `.stale`)."""
        try:
            names = [p.name for p in self.entries_dir.iterdir()]
        except FileNotFoundError:
            return []
        entries = [self._inspect(name) for name in names if _KEY_RE.fullmatch(name)]
        return sorted((e for e in entries if e is not None), key=lambda e: (e.spec, e.created))

    def show(self, key_prefix: str) -> Entry:
        """The entry whose key starts with `key_prefix` (which must pick exactly one)."""
        prefix = key_prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
            raise CacheError(f"{key_prefix!r} is not a cache key (hex digits)")
        matches = [e for e in self.list_entries() if e.key.startswith(prefix)]
        if not matches:
            raise CacheError(f"no cache entry with key {prefix} in {self.root}")
        if len(matches) > 1:
            raise CacheError(f"key prefix {prefix} is ambiguous: it matches "
                             f"{', '.join(e.key[:12] for e in matches)}")
        return matches[0]

    def clear(self, spec: str | None = None) -> int:
        """Remove every entry (or every entry of one spec); returns how many."""
        removed = 0
        for entry in self.list_entries():
            if spec is None or entry.spec == spec:
                removed += self._remove(entry.key)
        return removed

    def prune(self, older_than_days: float) -> int:
        """Remove entries unused for `older_than_days` days, and abandoned staging dirs."""
        if older_than_days < 0:
            raise ValueError(f"prune: older_than_days must be >= 0, got {older_than_days}")
        now = time.time()
        cutoff = now - older_than_days * 86400
        removed = sum(self._remove(e.key) for e in self.list_entries() if e.last_used < cutoff)
        abandoned = min(cutoff, now - STAGING_GRACE_SECONDS)
        with contextlib.suppress(FileNotFoundError):
            for leftover in (self.root / "tmp").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if leftover.stat().st_mtime < abandoned:
                        shutil.rmtree(leftover, ignore_errors=True)
        return removed

    def _remove(self, key: str) -> int:
        with self._lock(key):
            path = self.entries_dir / key
            if not os.path.lexists(path):
                return 0
            self._discard(path)
            return 1

    def export(self, path: Path) -> int:
        """Write every intact, current entry to a .tar.gz; returns how many."""
        path = Path(path)
        entries = [e for e in self.list_entries() if e.ok]
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for entry in entries:
                    names = [META_FILE, *entry.files]
                    if (entry.path / CONFIGS_FILE).is_file():
                        names.append(CONFIGS_FILE)
                    for name in names:
                        data = (entry.path / name).read_bytes()
                        info = tarfile.TarInfo(f"entries/{entry.key}/{name}")
                        info.size, info.mode, info.mtime = len(data), 0o644, int(entry.created)
                        tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return len(entries)

    def import_(self, path: Path) -> ImportReport:
        """Add the entries of an archive written by `export`.

        The whole archive is read and checked before anything is written: every member
        must be a plain file or directory under `entries/<key>/`, and every entry must
        hash to its key and match its meta.json. A rejected archive raises CacheError
        and writes nothing. Entries already cached intact are kept; their tuned configs
        gain the archive's configs for device/bucket pairs they lack.
        """
        staged = _read_archive(Path(path))
        staging = None
        added, present = [], []
        try:
            for key, files in sorted(staged.items()):
                with self._lock(key):
                    existing = self._inspect(key)
                    if existing is not None and existing.ok:
                        self._merge_configs(key, files.get(CONFIGS_FILE))
                        present.append(key)
                        continue
                    if staging is None:
                        staging = self._staging_dir("import")
                    (staging / key).mkdir()
                    for name, data in files.items():
                        _write_atomic(staging / key / name, data)
                    self._install(key, staging / key)
                    added.append(key)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return ImportReport(added=tuple(added), present=tuple(present))

    def _merge_configs(self, key: str, raw: bytes | None) -> None:
        if raw is None:
            return
        configs = self.configs(key)
        merged = False
        for device, buckets in json.loads(raw).items():
            for bucket, config in buckets.items():
                if bucket not in configs.setdefault(device, {}):
                    configs[device][bucket] = config
                    merged = True
        if merged:
            _write_atomic(self.entries_dir / key / CONFIGS_FILE, _json_bytes(configs))


# --- checks shared by loading and importing -----------------------------------------


def _entry_problem(key: str, read: Callable[[str], bytes | None]) -> tuple[dict, str | None]:
    """(meta, what is wrong or None) for the entry `key` whose files `read` returns."""
    raw = read(META_FILE)
    if raw is None:
        return {}, f"{META_FILE} is missing"
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"{META_FILE} is not valid JSON ({err})"
    if not (isinstance(meta, dict) and meta.get("format") == ENTRY_FORMAT
            and _is_str_dict(meta.get("files")) and _is_str_dict(meta.get("parts"))):
        return {}, f"{META_FILE} does not have the layout of entry format {ENTRY_FORMAT}"
    files, parts = meta["files"], meta["parts"]
    if meta.get("key") != key:
        return meta, f"{META_FILE} belongs to key {str(meta.get('key'))[:12]}..."
    if cache_key(parts) != key:
        return meta, f"its key parts in {META_FILE} do not hash to its key"
    for name, digest in sorted(files.items()):
        if not _FILE_NAME_RE.fullmatch(name) or name in (META_FILE, CONFIGS_FILE):
            return meta, f"{META_FILE} lists a file with a bad name, {name!r}"
        data = read(name)
        if data is None:
            return meta, f"{name} is missing"
        if _sha256(data) != digest:
            return meta, f"{name} does not match its sha256 in {META_FILE} (truncated or edited)"
    return meta, None


def _configs_problem(raw: bytes) -> str | None:
    try:
        configs = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"not valid JSON ({err})"
    if not isinstance(configs, dict) or not all(
            isinstance(b, dict) and all(isinstance(c, dict) for c in b.values())
            for b in configs.values()):
        return "expected {device: {bucket: config}}"
    return None


def _read_archive(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> file name -> bytes, for an archive whose every member and entry checks out."""
    staged: dict[str, dict[str, bytes]] = {}
    total = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                where = _archive_location(member)
                if where is None:  # a directory on the way to an entry's files
                    continue
                key, name = where
                if name in staged.setdefault(key, {}):
                    raise CacheError(f"{path}: {member.name!r} appears twice")
                total += member.size
                if member.size > MAX_IMPORT_FILE_BYTES or total > MAX_IMPORT_BYTES:
                    raise CacheError(f"{path}: {member.name!r} is too large for a cache entry")
                staged[key][name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise CacheError(f"{path}: not a readable .tar.gz archive ({err})") from None
    for key, files in staged.items():
        meta, problem = _entry_problem(key, files.get)
        if problem is None:
            unknown = set(files) - {META_FILE, CONFIGS_FILE, *meta["files"]}
            if unknown:
                problem = f"{', '.join(sorted(unknown))} not listed in {META_FILE}"
        if problem is None and CONFIGS_FILE in files:
            problem = _configs_problem(files[CONFIGS_FILE])
            problem = problem and f"{CONFIGS_FILE}: {problem}"
        if problem:
            raise CacheError(f"{path}: entry {key[:12]} rejected: {problem}")
    return staged


def _archive_location(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, file name) of a file member, None for a directory member; else CacheError."""
    name = member.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise CacheError(f"archive member {name!r} points outside the cache")
    if not (member.isfile() or member.isdir()):  # links, devices and fifos all fail this
        raise CacheError(f"archive member {name!r} is a link or device, not a plain file")
    if not parts or parts[0] != "entries" or len(parts) > 3 or (len(parts) == 3) != member.isfile():
        raise CacheError(f"archive member {name!r} is not a file under entries/<key>/")
    if len(parts) >= 2 and not _KEY_RE.fullmatch(parts[1]):
        raise CacheError(f"archive member {name!r}: {parts[1]!r} is not a cache key")
    if len(parts) < 3:
        return None
    if not _FILE_NAME_RE.fullmatch(parts[2]):
        raise CacheError(f"archive member {name!r}: bad file name")
    return parts[1], parts[2]


# --- small helpers -------------------------------------------------------------------


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a cache key (64 hex digits from cache_key): {key!r}")


def _check_file_name(name: str, what: str) -> None:
    if (not isinstance(name, str) or not _FILE_NAME_RE.fullmatch(name)
            or name in (META_FILE, CONFIGS_FILE)):
        raise ValueError(f"{what} {name!r}; use a plain file name such as 'fwd.py' "
                         f"(not {META_FILE} or {CONFIGS_FILE})")


def _is_str_dict(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old contents or the new, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
