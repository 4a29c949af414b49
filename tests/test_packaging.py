"""
The wheel holds everything an installed chatd needs: the package, the
twistd dropin (without an __init__.py beside it) and the templates and
static files as data files.
"""

import sys
import zipfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parents[1]


class WheelTests(TestCase):
    """
    Build the wheel as pip would and look inside.
    """

    timeout = 300

    async def test_wheel_contents(self) -> None:
        """
        The wheel ships chatd, chatd.store, the dropin, every template and
        static file, and no dropin.cache or twisted/plugins/__init__.py.
        """
        self.assertTrue((ROOT / "setup.cfg").is_file(), "run the tests from a checkout")
        out = Path(self.mktemp()).resolve()
        out.mkdir(parents=True)
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
            env=None,
            path=str(out),
            reactor=reactor,
        )
        self.assertEqual(code, 0, stderr.decode("utf-8", "replace"))
        (wheel,) = out.glob("chatd-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        data = next(n.split("/")[0] for n in names if ".data/" in n)
        expected = {
            "chatd/__init__.py",
            "chatd/core.py",
            "chatd/tap.py",
            "chatd/store/memory.py",
            "twisted/plugins/chatd_plugin.py",
        }
        for folder in ("templates", "static"):
            for path in (ROOT / folder).iterdir():
                expected.add(f"{data}/data/share/chatd/{folder}/{path.name}")
        self.assertEqual(expected - names, set())
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertFalse([n for n in names if "dropin.cache" in n or "__pycache__" in n])
