"""Atomic writes: a reader (another process, a run that resumes or loads the output) finds the old file or folder, or
the new one, never half of one. Each is written beside its target, on the same filesystem, and renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader never sees a half-written file.

    The text goes to a temporary file beside ``path``, which then replaces ``path`` (``os.replace``). The file gets
    the permissions ``open()`` would give a new one (0666 less the umask); an existing ``path`` is replaced. Missing
    parent folders are created.

    Args:
        path: The file to write.
        text: Its new contents.

    Raises:
        OSError: the folder or the file cannot be written (the temporary file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp's are private: 0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_dir_atomic(target: Path, *writers: Callable[[Path], object], replace: bool) -> None:
    """Write a folder atomically: each of ``writers`` fills a fresh temporary folder beside ``target`` (e.g.
    ``model.save_pretrained``, then ``tokenizer.save_pretrained``), which is then renamed to ``target``.

    The temporary folder is ``.<name>-XXXXXXXX`` in ``target``'s parent (created if missing), so the rename stays on one
    filesystem; it is removed if anything fails. Like ``tempfile.mkdtemp``'s, the folder is private (mode 0700).

    Args:
        target: The folder to write.
        writers: Each is called with the temporary folder, in order, and writes its part there.
        replace: What happens to a folder already at ``target``. True: it is replaced: renamed aside to
            ``.<name>-old``, the new one renamed in, the old one deleted (in between, for a moment, there is no
            ``target``; there is never a half-written one). False: it is kept, and this call raises (the rename
            fails), so that a caller can tell a concurrent writer's finished folder from an error; an empty folder is
            replaced (as ``os.rename`` does).

    Raises:
        OSError: with ``replace=False``, a non-empty folder at ``target`` (the new one is removed); the folder cannot be
            written or renamed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    old = target.with_name(f".{target.name}-old")
    try:
        for write in writers:
            write(tmp)
        if replace and target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        shutil.rmtree(old, ignore_errors=True)
