"""Where recnix's own programs are: beside the running ``recnix`` (its venv's ``bin``, also
when ``recnix`` is a link to it, as pipx makes), else on PATH.

pipx links only the console script onto PATH; the hooks stay in the venv beside it, so
PATH alone does not find them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def installed_program(name: str) -> str | None:
    """The absolute path of recnix's program ``name`` (e.g. ``recnix-pre-build-hook``),
    or None if it is neither beside the running recnix nor on PATH."""
    if sys.argv and sys.argv[0]:
        beside = Path(sys.argv[0]).resolve().parent / name
        if os.access(beside, os.X_OK):
            return str(beside)
    found = shutil.which(name)
    return str(Path(found).resolve()) if found else None
