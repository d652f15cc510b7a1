"""The one error hierarchy: every mistake a user can fix is a `BigrmError`, which the command line turns into one
line (`error: ...`, printed once, by rank 0) and exit code 2. The subclasses say where the mistake lies; each also
derives from the builtin exception it was before, so callers that catch ValueError or RuntimeError still do."""

from pathlib import Path


class BigrmError(Exception):
    """A problem with the user's input, options or files: reported as one line, exit code 2."""


class ConfigError(BigrmError, ValueError):
    """A bad option: the message names the file (if any) and the key."""


class DataError(BigrmError, ValueError):
    """Invalid input data; the message lists every offending file, row and field."""


class CheckpointError(BigrmError, RuntimeError):
    """A checkpoint that cannot be resumed, loaded or pruned as asked."""


class ExportError(BigrmError, RuntimeError):
    """An export that cannot be written, or that does not reproduce the trained model."""


def make_directory(path: Path, flag: str, hint: str = "") -> None:
    """Option `flag`'s directory `path`, created if absent: ConfigError (one line, ending in `hint`) if it is a file
    or cannot be created."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; give a directory{hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot create it ({err.strerror}){hint}") from None


class ProcessDied(BigrmError, RuntimeError):
    """A helper process (the token cache builder, a tokenising worker) ended from outside: a signal, the
    out-of-memory killer. Nothing it wrote is used."""


class Diverged(BigrmError, RuntimeError):
    """Raised on every rank at the same step: the run stops without exporting a diverged model."""


def write_failure(err: BaseException) -> str | None:
    """What went wrong, when `err` is a failed write (a full disk, a directory that cannot be written) as Python,
    numpy, torch or safetensors report one; None for any other error."""
    if isinstance(err, OSError):
        return (err.strerror or str(err)) + (f" ({err.filename})" if err.filename else "")
    first = (str(err).splitlines() or [""])[0]
    if type(err).__name__ == "SafetensorError" and "I/O error" in first:
        return first
    if isinstance(err, RuntimeError) and ("inline_container" in first or "PytorchStreamWriter" in first):
        return f"torch could not write a file, a full disk? ({first})"  # its words for ENOSPC: "unexpected pos"
    return None
