"""A directory of token stores found by a key of everything that decides the tokens, built by one process.

`get_or_build(root, key, build)` returns `root/key`, a complete directory: it either exists (a later run, another
rank, a resumed job) or this process builds it. Builders are serialised by an exclusive lock on `root/key.lock` (an
OS file lock, released if its holder dies): the others poll for it, outside any collective, so however long a build
takes no process-group timeout can fire. A build writes into a temporary directory that is renamed into place when
complete, and `complete.json` (written last) records every file's size and content hash: a directory that does not
match its sizes is torn (a copy cut short, a disk that filled), one whose content differs is damaged (bytes changed
in place); either is rebuilt. Every process checks the hashes of an entry each time it uses it (memory-mapped: ~0.2 s
per 2 GB from the page cache, pages that training reads anyway).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from bigrm.errors import ConfigError, ProcessDied, make_directory, write_failure
from bigrm.hashing import differs, listing

MARK = "complete.json"
POLL_S = 0.5


def digest_file(path: Path) -> str:
    """The content hash of a file, or of a directory's files (names and contents)."""
    h = xxhash.xxh3_128()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0" if path.is_dir() else b"")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def digest_tokenizer(tokenizer) -> str:
    """The hash of the files `save_pretrained` writes: vocabulary, merges, special tokens, chat template."""
    h = xxhash.xxh3_128()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            content = f.read_bytes()
            if f.name == "tokenizer_config.json":  # where it was loaded from is not what it does
                config = json.loads(content)
                config.pop("name_or_path", None)
                content = json.dumps(config, sort_keys=True).encode()
            h.update(f.name.encode() + b"\0" + content)
    return h.hexdigest()


def key_of(parts: dict) -> str:
    return xxhash.xxh3_128(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _record(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / MARK).read_text())
        return record if isinstance(record.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def damage(directory: Path, content: bool = True) -> str | None:
    """Why the directory is not a complete entry (the first file that differs from its record), or None; sizes only
    unless `content`."""
    record = _record(directory)
    if record is None:
        return f"{directory / MARK} is missing or unreadable"
    return differs(directory, record["files"], content)


def read_complete(directory: Path) -> dict | None:
    """The directory's completion record, or None when it is absent, unreadable or its files' sizes disagree."""
    return _record(directory) if damage(directory, content=False) is None else None


def get_or_build(root: Path, key: str, build: Callable[[Path], dict]) -> tuple[Path, bool, str | None]:
    """(root/key, whether this call built it, the damage this call found in it before it was rebuilt or None).
    `build(tmp)` writes the files into tmp and returns the metadata to record; it runs in a forked child process, so
    the rows and the builder's memory never stay in the caller's."""
    make_directory(root, "data.cache_dir", " (or set data.cache false)")
    final, found = root / key, None
    while True:
        if final.exists():
            problem = damage(final)
            if problem is None:
                return final, False, found
            found = problem
        try:
            lock = open(root / f"{key}.lock", "w")
        except OSError as err:
            raise ConfigError(
                f"data.cache_dir: cannot write in {root} ({err.strerror}); or set data.cache false"
            ) from None
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process builds it: wait for it without holding any collective
                time.sleep(POLL_S)
                continue
            if damage(final) is None:
                return final, False, found
            # under the lock: anything left is a dead builder's partial work, a torn copy or a damaged entry
            for stale in [final, *root.glob(f".{key}.tmp-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            _build(root, final, build)
            return final, True, found


def _build(root: Path, final: Path, build: Callable[[Path], dict]) -> None:
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        meta = _in_child(build, tmp)
        files = listing(tmp, sorted(f for f in tmp.rglob("*") if f.is_file()))
        (tmp / MARK).write_text(json.dumps({"files": files, "meta": meta}))
        os.replace(tmp, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, ProcessDied):
            raise ProcessDied(f"{err}: nothing of it is kept, the next run builds the token cache again") from None
        failure = write_failure(err)
        if failure is None:
            raise
        raise ConfigError(
            f"data.cache_dir: cannot write the token cache in {root}: {failure}: free space there, set data.cache_dir "
            "elsewhere or data.cache false"
        ) from None


def _in_child(fn: Callable[[Path], dict], arg: Path) -> dict:
    """fn(arg) in a forked process: its result, or the exception it raised, raised here; ProcessDied if it is
    killed. An interrupt here (SIGINT, SIGTERM: the trainer's handlers raise) ends it first."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def target() -> None:
        # forked with the trainer's handlers: a SIGTERM must end the builder, not be handed back as the trainer's
        # own stop; an interrupt (Ctrl-C reaches the whole process group) is the parent's to act on
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            send.send((True, fn(arg)))
        except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
            send.send((False, err))

    child = context.Process(target=target)
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        code = child.exitcode
        how = f"by {signal.Signals(-code).name}" if code < 0 else f"with exit code {code}"
        raise ProcessDied(f"the token cache builder (pid {child.pid}) was killed {how}") from None
    except BaseException:
        child.kill()  # its tokenising workers end with it (tokenise.end_with_parent)
        child.join()
        raise
    child.join()
    if not ok:
        raise value
    return value
