"""
chatd as a real twistd process on a real store: a clean restart (SIGTERM)
and a crash (SIGKILL while clients post) lose nothing that was
acknowledged, and seq numbering continues exactly.
"""

import os
from typing import Dict, List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from tests._support import HTTP, ChatdProcess, WSClient
from tests.test_store import postgres_url


class DurabilityMixin:
    """
    Run against the store that store_args() names.
    """

    timeout = 120

    def store_args(self) -> Tuple[str, ...]:
        raise NotImplementedError

    async def assertStoppedCleanly(self, process: ChatdProcess) -> None:
        """
        SIGTERM: chatd shuts down in order (closing the store) and exits 0.
        """
        await process.stop("TERM")
        self.assertEqual((process.exit_code, process.signal), (0, None), process.output)
        self.assertIn(b"Server Shut Down.", process.output)

    async def chatd(self) -> Tuple[ChatdProcess, HTTP]:
        process = await ChatdProcess.start(self, *self.store_args())
        return process, HTTP(self, process.base)

    async def test_restart_resumes_exactly(self) -> None:
        """
        Messages, rooms and seq numbers survive SIGTERM and a restart; a
        client resuming with ?after= sees no gap and no duplicate.
        """
        process, http = await self.chatd()
        code, _ = await http.post_json("/api/rooms", {"name": "kept"})
        self.assertEqual(code, 201)
        watcher = await WSClient.connect(self, process.base, "/ws/kept")
        for i in range(30):
            code, _ = await http.post_json("/api/rooms/kept/messages", {"body": f"m{i}", "client_id": f"c{i}"})
            self.assertEqual(code, 201)
        await watcher.wait_for_seq(30)
        await self.assertStoppedCleanly(process)

        process, http = await self.chatd()
        code, rooms = await http.get_json("/api/rooms")
        self.assertEqual(
            {r["name"]: r["last_seq"] for r in rooms["rooms"]}, {"kept": 30, "lobby": 0}
        )
        resumed = await WSClient.connect(self, process.base, f"/ws/kept?after={watcher.seqs[-1] - 10}")
        code, retry = await http.post_json("/api/rooms/kept/messages", {"body": "m3", "client_id": "c3"})
        self.assertEqual(retry["seq"], 4)
        code, new = await http.post_json("/api/rooms/kept/messages", {"body": "after restart"})
        self.assertEqual(new["seq"], 31)
        await resumed.wait_for_seq(31)
        self.assertEqual(resumed.seqs, list(range(21, 32)))
        code, batch = await http.get_json("/api/rooms/kept/messages?after=0&limit=1000")
        self.assertEqual(
            [m["body"] for m in batch["messages"]], [f"m{i}" for i in range(30)] + ["after restart"]
        )
        await self.assertStoppedCleanly(process)

    async def test_crash_loses_no_acknowledged_message(self) -> None:
        """
        kill -9 while four clients post concurrently: after a restart every
        message any client saw acknowledged is there with the same seq, and
        the seqs run 1..N with no gap.
        """
        process, http = await self.chatd()
        acked: Dict[int, str] = {}
        enough = 120

        async def poster(n: int) -> None:
            for i in range(10_000):
                body = f"p{n}-{i}"
                try:
                    code, answer = await http.post_json(
                        "/api/rooms/lobby/messages", {"body": body, "client_id": body}
                    )
                except Exception:
                    return  # the server is gone
                if code != 201:
                    return
                acked[answer["seq"]] = body
                if len(acked) >= enough and not process.ended.called:
                    # Kill it now, with the other posters' requests in flight.
                    process.transport.signalProcess("KILL")

        await gatherResults([ensureDeferred(poster(n)) for n in range(4)])
        await process.ended
        self.assertEqual(process.signal, 9)
        self.assertGreaterEqual(len(acked), enough)

        process, http = await self.chatd()
        code, batch = await http.get_json("/api/rooms/lobby/messages?after=0&limit=1000")
        stored: List[dict] = batch["messages"]
        seqs = [m["seq"] for m in stored]
        self.assertEqual(seqs, list(range(1, len(stored) + 1)))
        by_seq = {m["seq"]: m["body"] for m in stored}
        for seq, body in acked.items():
            self.assertEqual(by_seq.get(seq), body, f"acknowledged seq {seq} lost")
        self.assertEqual(len(set(by_seq.values())), len(stored), "a message was stored twice")
        code, new = await http.post_json("/api/rooms/lobby/messages", {"body": "after crash"})
        self.assertEqual(new["seq"], len(stored) + 1)
        await self.assertStoppedCleanly(process)


class SQLiteDurabilityTests(DurabilityMixin, TestCase):
    """
    The default store, SQLite.
    """

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)

    def store_args(self) -> Tuple[str, ...]:
        # No --store: the default SQLite file under --data-dir.
        return ("--data-dir", self.folder)


class PostgresDurabilityTests(DurabilityMixin, TestCase):
    """
    PostgreSQL.
    """

    def setUp(self) -> None:
        self.url = postgres_url(self)

    def store_args(self) -> Tuple[str, ...]:
        return ("--store", self.url)


class StartupFailureTests(TestCase):
    """
    A store chatd cannot use stops twistd at start-up with one clear line
    and a non-zero exit status.
    """

    timeout = 60

    async def assertFailsWith(self, expected: bytes, *args: str) -> bytes:
        process = ChatdProcess.spawn(self, "--port", "tcp:0:interface=127.0.0.1", *args)
        process.listening.addErrback(lambda _: None)
        await process.ended
        self.assertEqual(process.exit_code, 1, process.output)
        self.assertIn(expected, process.output)
        self.assertNotIn(b"Traceback", process.output)
        self.assertNotIn(b"chatd listening", process.output)
        return process.output

    async def test_unreachable_postgres(self) -> None:
        """
        An unreachable PostgreSQL server: one line naming the store, the
        password hidden.
        """
        output = await self.assertFailsWith(
            b"chatd could not start: cannot open the postgresql://chatd:***@127.0.0.1:1/x store",
            "--store",
            "postgresql://chatd:hunter2@127.0.0.1:1/x",
        )
        self.assertNotIn(b"hunter2", output)

    async def test_unusable_sqlite_file(self) -> None:
        """
        A SQLite path that cannot be opened (a folder).
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        await self.assertFailsWith(
            f"chatd could not start: cannot open the sqlite:{folder} store".encode(),
            "--store",
            f"sqlite:{folder}",
        )

    async def test_port_in_use(self) -> None:
        """
        A --port (or --metrics-port) someone else listens on: one line
        naming it, exit status 1, no traceback, no data file made, and
        twistd's pid file removed.
        """
        taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        self.addCleanup(taken.stopListening)
        busy = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        for args in (["--port", busy], ["--port", "tcp:0:interface=127.0.0.1", "--metrics-port", busy]):
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            pidfile = os.path.abspath(self.mktemp())
            process = ChatdProcess.spawn(self, "--data-dir", folder, *args, pidfile=pidfile)
            process.listening.addErrback(lambda _: None)
            await process.ended
            self.assertFalse(os.path.exists(pidfile), "the pid file was left behind")
            self.assertEqual(process.exit_code, 1, process.output)
            lines = [line for line in process.output.splitlines() if b"could not start" in line]
            self.assertEqual(len(lines), 1, process.output)
            self.assertIn(f"cannot listen on {busy}:backlog=1024: ".encode(), lines[0])
            self.assertIn(b"Address already in use", lines[0])
            self.assertNotIn(b"Traceback", process.output)
            self.assertNotIn(b"Unhandled", process.output)
            self.assertNotIn(b"chatd listening", process.output)
            self.assertEqual(os.listdir(folder), [], "a data file was made")

    async def test_postgresql_without_psycopg(self) -> None:
        """
        --store postgresql://... where psycopg cannot be imported: the
        documented one line, exit status 1, no traceback.
        """
        fake = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(fake, "psycopg"))
        with open(os.path.join(fake, "psycopg", "__init__.py"), "w") as f:
            f.write("raise ImportError('psycopg is not installed here')\n")
        process = ChatdProcess.spawn(
            self, "--store", "postgresql://postgres@127.0.0.1:5432/test", env={"PYTHONPATH": fake}
        )
        process.listening.addErrback(lambda _: None)
        await process.ended
        self.assertEqual(process.exit_code, 1, process.output)
        self.assertEqual(
            process.output.strip(),
            b"chatd could not start: the postgresql store needs psycopg: "
            b"pip install 'chatd[postgresql]'",
        )

    async def test_bad_scheme(self) -> None:
        """
        An unknown store scheme is a usage error.
        """
        process = ChatdProcess.spawn(self, "--store", "mysql://x")
        process.listening.addErrback(lambda _: None)
        await process.ended
        self.assertEqual(process.exit_code, 1)
        self.assertIn(b"--store 'mysql://x': use sqlite:PATH", process.output)
