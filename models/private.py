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
