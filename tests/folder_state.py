"""A folder's state, to show that a command left it as it was (tests/ is on sys.path).

    before = snapshot(run)
    ...  # a command that must not write there
    assert snapshot(run) == before
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` by its path: a file by the SHA-256 of its bytes, a folder as
    ``"folder"``, a symbolic link by its target (links are not followed)."""
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                seen[rel] = "link -> " + os.readlink(path)
            elif name in dirs:
                seen[rel] = "folder"
            else:
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(seen.items()))
