"""Storage errors: a full disk, a quota, a read-only or forbidden data dir. Retrying the work that hit
one fails the same way and, worse, pays again for calls whose replies could not be journaled; a
command reports one in one line instead."""
from __future__ import annotations

import errno

# errno -> what the one line says before the path
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EFBIG: "file size limit reached on",
    errno.EROFS: "read-only file system at",
    errno.EACCES: "permission denied on",
}
# libraries that do not raise OSError (DuckDB's IOException) still name the cause in their message
_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "Read-only file system": errno.EROFS}


def storage_cause(error: BaseException | None) -> tuple[int, BaseException] | None:
    """(errno, exception) of the storage error behind `error`: itself, or one it was raised from."""
    for _ in range(8):
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error.errno, error
        if not isinstance(error, OSError) or error.errno is None:
            for text, number in _MESSAGES.items():
                if text in str(error):
                    return number, error
        error = error.__cause__ or error.__context__
    return None


def is_storage_error(error: BaseException | None) -> bool:
    return storage_cause(error) is not None


def describe_storage_error(error: BaseException, where: str) -> str:
    """One line: `no space left on <path>`, the path the error names, else `where` (e.g. the data dir)."""
    number, cause = storage_cause(error) or (None, error)
    path = getattr(cause, "filename", None) or where
    return f"{STORAGE_ERRNOS.get(number, 'storage error on')} {path}"
