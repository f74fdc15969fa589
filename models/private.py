"""Owner-only files and folders for what may hold patient data (prefix cache, transcripts).

Permissions are given when a file is created (os.open with mode 0o600), never through a
process-wide umask, which would race with other threads creating files at the same time.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """Create `path` (and parents) as needed; the folder itself ends up 0700 if it is ours."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = path.stat()
    # An existing folder is tightened, but only one this user owns: never chmod someone else's.
    if st.st_uid == os.getuid() and st.st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def write_private(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically as a 0600 file (a temporary name, then a rename)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, FILE_MODE)  # in case the file system ignored the creation mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_secret(path: str | Path, what: str) -> str:
    """A secret's file (API keys, an RPC key), refused unless only its owner can read it, as ssh refuses an
    unprotected private key: on a shared machine another user could otherwise read and use it."""
    import stat

    from .errors import HuatuoError

    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise HuatuoError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise HuatuoError(f"{path}: not a regular file; {what} must be in one")
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise HuatuoError(f"{path}: {what} readable by other users (mode {info.st_mode & 0o777:o}"
                              f"{'' if info.st_uid == os.getuid() else ', owned by another user'}); "
                              f"`chmod 600 {path}` and keep it yours")
        data = f.read(1024 * 1024 + 1)
    if len(data) > 1024 * 1024:
        raise HuatuoError(f"{path}: larger than 1 MiB; not {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HuatuoError(f"{path}: {what} must be UTF-8 text") from None
