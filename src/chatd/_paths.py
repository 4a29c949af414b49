# -*- test-case-name: tests.test_tap -*-
"""
Where an installed (or checked-out) chatd finds its C{templates/} and
C{static/} folders.

They sit outside the package, so a wheel installs them as data files
under C{<prefix>/share/chatd/}; a source checkout has them at its top.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

__all__ = ["find_data_dir"]

# A file each folder must hold, so that a stray folder of the same name is
# not mistaken for ours.
_MARKERS = {"templates": "room.html", "static": "chat.js"}


def _candidates(name: str) -> List[Path]:
    # Running from a checkout (or an editable install): src/chatd/_paths.py
    # -> the checkout's top folder, so edits show up without reinstalling.
    found = [Path(__file__).resolve().parents[2] / name]
    roots = [Path(sysconfig.get_path("data")), Path(sys.prefix)]
    try:
        roots.append(Path(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user"))))
    except (KeyError, AttributeError):
        pass
    found += [root / "share" / "chatd" / name for root in roots]
    return found


def find_data_dir(name: str) -> Optional[Path]:
    """
    The first C{templates} or C{static} folder that holds chatd's files,
    or C{None}.
    """
    for candidate in _candidates(name):
        if (candidate / _MARKERS[name]).is_file():
            return candidate
    return None
