"""Paths relative to one folder that may not lead outside it (split rows, few-shot caches). No torch here."""
from __future__ import annotations

import os


class FolderGuard:
    """Resolves paths relative to one folder, refusing any that lead outside it.

    A path is refused if it is absolute, has a ``..`` part, or passes through a
    symbolic link (in a folder or the file itself) that points outside. The
    folder itself may be a link.
    """

    def __init__(self, folder):
        self.folder = folder
        self.real = os.path.realpath(folder)
        self._real_dirs = {}

    def resolve(self, relpath):
        """``folder/relpath``, or None when it would lead outside the folder."""
        if not isinstance(relpath, str) or not relpath or "\0" in relpath or os.path.isabs(relpath) \
                or ".." in relpath.split(os.sep):
            return None
        path = os.path.join(self.folder, relpath)
        parent = os.path.dirname(path)
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(parent)
        real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_parent, os.path.basename(path))
        if not real.startswith(self.real.rstrip(os.sep) + os.sep):
            return None
        return path
