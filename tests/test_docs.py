"""
The documentation's examples, run as a reader would run them.

Every C{curl} line in a C{```sh} block of C{docs/*.md} runs in bash, in
order, against a live C{twistd -n chatd} started as the text says, and
prints what the C{# ...} lines right after it show.  A C{```python}
block followed by a C{```text} block that starts with C{$ python ...}
runs and prints that block; a C{```js} block marked C{<!-- docs-test:
browser PATH -->} runs in Chromium on that page and logs the C{```text}
block after it.  In expected output C{...} stands for anything, and
C{"ts"} values may differ.

Markers (HTML comments, invisible when the page is rendered):
C{<!-- docs-test: server ARGS -->} starts a fresh server with ARGS for the
examples after it; C{<!-- docs-test: server continue -->} goes back to the
file's first server; C{<!-- docs-test: setup -->} before a C{```sh} block
runs its commands in the next server's folder before that server starts
(to make a file its ARGS name).  Commands run in their server's folder.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests._support import ChatdProcess
from tests.test_browser import CHROMIUM, FLAGS, WAIT_MS, _playwright

DOCS = Path(__file__).resolve().parent.parent / "docs"
_DIRECTIVE = re.compile(r"<!-- docs-test: (server|browser|setup) ?(.*?) -->")
_TS = re.compile(r'("ts": ?)\d+(?:\.\d+)?')


@dataclass
class Example:
    """
    One example: C{sh} (a shell command), C{python} (a script and its
    arguments) or C{browser} (JavaScript run on C{page}).
    """

    kind: str
    code: str
    expected: List[str]
    where: str
    server: Tuple[str, ...] = ()
    args: List[str] = field(default_factory=list)
    page: str = "/"
    #: Run before its server starts (C{<!-- docs-test: setup -->}).
    setup: bool = False


def examples(path: Path) -> List[Example]:
    """
    The examples of one Markdown file, in order.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    found: List[Example] = []
    first_server: Tuple[str, ...] = ()
    server = first_server
    browser: Optional[str] = None
    setup: List[Example] = []
    take_setup = False
    i = 0

    def block(start: int) -> Tuple[List[str], int]:
        end = start + 1
        while not lines[end].startswith("```"):
            end += 1
        return lines[start + 1 : end], end + 1

    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.fullmatch(line.strip())
        if directive:
            what, value = directive.groups()
            if what == "server":
                server = first_server if value == "continue" else tuple(shlex.split(value))
                for example in setup:
                    example.server = server
                found.extend(setup)
                setup = []
            elif what == "setup":
                take_setup = True
            else:
                browser = value
            i += 1
            continue
        where = f"{path.name}:{i + 1}"
        if line.startswith("```sh"):
            body, i = block(i)
            if take_setup:
                setup.extend(_shell(body, where, server, setup=True))
                take_setup = False
            else:
                found.extend(_shell(body, where, server))
        elif line.startswith("```python"):
            code, i = block(i)
            output, i = _next_text(lines, i, block)
            assert output and output[0].startswith("$ "), f"{where}: a python example needs its output"
            args = shlex.split(output[0][2:])[2:]  # past "python script.py"
            found.append(Example("python", "\n".join(code), output[1:], where, server, args))
        elif line.startswith("```js") and browser is not None:
            code, i = block(i)
            output, i = _next_text(lines, i, block)
            found.append(Example("browser", "\n".join(code), output, where, server, page=browser))
            browser = None
        elif line.startswith("```"):
            _, i = block(i)
        else:
            i += 1
    return found


def _next_text(lines: List[str], i: int, block) -> Tuple[List[str], int]:  # type: ignore[no-untyped-def]
    while i < len(lines) and not lines[i].strip():
        i += 1
    assert lines[i].startswith("```text"), f"line {i + 1}: expected the example's output"
    return block(i)


def _shell(
    body: List[str], where: str, server: Tuple[str, ...], setup: bool = False
) -> List[Example]:
    found: List[Example] = []
    i = 0
    while i < len(body):
        line = body[i]
        if not line.strip() or line.startswith("#"):
            i += 1
            continue
        command = line
        while command.endswith("\\"):
            i += 1
            command = command[:-1].rstrip() + " " + body[i].strip()
        i += 1
        expected = []
        while i < len(body) and body[i].startswith("# "):
            expected.append(body[i][2:])
            i += 1
        found.append(Example("sh", command, expected, where, server, setup=setup))
    return found


def matches(expected: List[str], output: str) -> bool:
    """
    Whether C{output}'s lines are C{expected}'s, C{...} matching anything.
    """
    got = output.splitlines()
    if len(got) != len(expected):
        return False
    for want, line in zip(expected, got, strict=True):
        pattern = re.escape(_TS.sub(r"\1...", want)).replace(re.escape("..."), ".*?")
        if not re.fullmatch(pattern, line):
            return False
    return True


class ParseTests(SynchronousTestCase):
    """
    The example reader itself.
    """

    def test_matches(self) -> None:
        """
        C{...} matches anything on its line; ts values may differ; the
        number of lines must agree.
        """
        self.assertTrue(matches(['{"a":1,...,"z":2}'], '{"a":1,"b":[3],"z":2}'))
        self.assertTrue(matches(['{"seq":1,"ts":1795837942.443}'], '{"seq":1,"ts":1.5}'))
        self.assertFalse(matches(['{"seq":1}'], '{"seq":2}'))
        self.assertFalse(matches(["a"], "a\nb"))

    def test_every_curl_is_an_example(self) -> None:
        """
        Every curl command in every doc's shell blocks is found, so none
        goes unchecked.
        """
        for path in sorted(DOCS.glob("*.md")):
            text = path.read_text(encoding="utf-8")
            in_sh = re.findall(r"```sh\n(.*?)```", text, re.S)
            curls = sum(1 for block in in_sh for line in block.splitlines() if line.startswith("curl"))
            found = sum(1 for e in examples(path) if e.kind == "sh" and e.code.startswith("curl"))
            self.assertEqual(found, curls, path.name)


class DocsExamplesTests(TestCase):
    """
    Each doc's examples against live servers (one test per doc).
    """

    timeout = 120

    async def run_examples(self, path: Path) -> None:
        found = examples(path)
        self.assertTrue(found, f"{path.name} has no examples")
        servers: Dict[Tuple[str, ...], ChatdProcess] = {}
        folders: Dict[Tuple[str, ...], str] = {}
        for example in found:
            folder = folders.get(example.server)
            if folder is None:
                folder = folders[example.server] = os.path.abspath(self.mktemp())
                os.makedirs(folder)
            if example.setup:
                output = await self._sh(example.code, folder, example.where)
            else:
                server = servers.get(example.server)
                if server is None:
                    server = servers[example.server] = await self.start(example.server, folder)
                output = await getattr(self, f"run_{example.kind}")(example, server)
            self.assertTrue(
                matches(example.expected, output),
                f"{example.where}: {example.code}\nexpected:\n" + "\n".join(example.expected)
                + f"\ngot:\n{output}",
            )

    async def start(self, args: Tuple[str, ...], folder: str) -> ChatdProcess:
        """
        chatd as the docs run it, in a folder of its own (the default
        store is ./chatd.sqlite3), with the default rate limit.
        """
        process = ChatdProcess.spawn(
            self, "--port", "tcp:0:interface=127.0.0.1", "--rate-limit", "10/5", *args, path=folder
        )
        await process.listening
        process.folder = folder  # type: ignore[attr-defined]
        return process

    @staticmethod
    def _local(text: str, server: ChatdProcess) -> str:
        return text.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}").replace(
            "localhost:8080", f"localhost:{server.port}"
        )

    async def run_sh(self, example: Example, server: ChatdProcess) -> str:
        folder = server.folder  # type: ignore[attr-defined]
        return await self._sh(self._local(example.code, server), folder, example.where)

    async def _sh(self, command: str, folder: str, where: str) -> str:
        # The venv's commands (python, chatd-admin) first, as a reader's
        # activated venv has them.
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        out, err, code = await getProcessOutputAndValue(
            "bash", ["-c", command], env={**os.environ, "PATH": path}, path=folder
        )
        self.assertEqual(code, 0, f"{where}: {err.decode()}")
        return out.decode("utf-8")

    async def run_python(self, example: Example, server: ChatdProcess) -> str:
        script = os.path.join(os.path.abspath(self.mktemp()) + ".py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(example.code.replace("8080", str(server.port)))
        out, err, code = await getProcessOutputAndValue(sys.executable, [script, *example.args], env=os.environ)
        self.assertEqual(code, 0, f"{example.where}: {err.decode()}")
        return out.decode("utf-8")

    async def run_browser(self, example: Example, server: ChatdProcess) -> str:
        sync_playwright = _playwright()
        url = server.base + example.page
        wanted = len(example.expected)

        def run() -> str:
            logged: List[str] = []
            done = threading.Event()

            def console(message: object) -> None:
                if getattr(message, "type", None) == "log":
                    logged.append(message.text)
                    if len(logged) >= wanted:
                        done.set()

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                try:
                    page = browser.new_page()
                    page.set_default_timeout(WAIT_MS)
                    page.goto(url)
                    page.on("console", console)
                    page.evaluate("() => {\n" + example.code + "\n}")
                    for _ in range(WAIT_MS // 100):
                        if done.is_set():
                            break
                        page.wait_for_timeout(100)
                finally:
                    browser.close()
            return "\n".join(logged)

        return await deferToThread(run)


def _doc_test(path: Path):  # type: ignore[no-untyped-def]
    async def test(self: DocsExamplesTests) -> None:
        await self.run_examples(path)

    test.__doc__ = f"""
        Every example in docs/{path.name} prints what the doc says.
        """
    return test


for _path in sorted(DOCS.glob("*.md")):
    if examples(_path):
        setattr(DocsExamplesTests, f"test_{_path.stem}", _doc_test(_path))
