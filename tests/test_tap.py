"""
Tests for L{chatd.tap} and the twistd plugin: option parsing, clear
errors, and a service that really listens.
"""


from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd import tap


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    """
    C{twistd chatd} options.
    """

    def test_defaults(self) -> None:
        """
        Port tcp:8080, history 500, no extra rooms, data folders found.
        """
        options = parse()
        self.assertEqual(options["port"], "tcp:8080:backlog=1024")
        self.assertEqual(options["history"], 500)
        self.assertEqual(options["rooms"], [])
        self.assertTrue((options["templates"] / "room.html").is_file())
        self.assertTrue((options["static"] / "chat.js").is_file())

    def test_bare_port_number(self) -> None:
        """
        A bare number means tcp:N; full descriptions pass through.
        """
        self.assertEqual(parse("--port", "9000")["port"], "tcp:9000:backlog=1024")
        self.assertEqual(
            parse("--port", "tcp:0:interface=127.0.0.1")["port"],
            "tcp:0:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(parse("-p", "unix:/tmp/x.sock")["port"], "unix:/tmp/x.sock:backlog=1024")

    def test_listen_backlog(self) -> None:
        """
        A listening endpoint gets a listen queue fit for a reconnecting
        crowd (1024) unless it names its own; endpoint types without one
        are left alone.
        """
        for given, expected in [
            ("tcp:80:backlog=64", "tcp:80:backlog=64"),
            ("haproxy:tcp:8081:interface=10.0.0.11", "haproxy:tcp:8081:interface=10.0.0.11:backlog=1024"),
            ("haproxy:tcp:8081:backlog=10", "haproxy:tcp:8081:backlog=10"),
            ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem:backlog=1024"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ]:
            self.assertEqual(tap.with_backlog(given), expected)

    def test_bus(self) -> None:
        """
        The bus follows the store unless chosen: local with SQLite or
        memory, postgresql with a PostgreSQL store; a choice that cannot
        work is refused with what to do.
        """
        pg = "postgresql://127.0.0.1/test"
        self.assertEqual(parse()["bus"], "local")
        self.assertEqual(parse("--store", "memory:")["bus"], "local")
        self.assertEqual(parse("--store", pg)["bus"], "postgresql")
        self.assertEqual(parse("--store", pg, "--bus", "local")["bus"], "local")
        self.assertEqual(
            parse("--store", pg, "--bus", "redis://127.0.0.1:6379/1")["bus"], "redis://127.0.0.1:6379/1"
        )
        for args, expected in [
            (("--bus", "postgresql"), "needs a PostgreSQL store"),
            (("--store", "memory:", "--bus", "redis://127.0.0.1"), "a store the nodes share"),
            (("--store", pg, "--bus", "redis://127.0.0.1/x"), "must be numbers"),
            (("--bus", "nats://x"), "use local, postgresql or redis://"),
        ]:
            with self.assertRaises(usage.UsageError) as e:
                parse(*args)
            self.assertIn(expected, str(e.exception))

    def test_bad_port(self) -> None:
        """
        An endpoint description that cannot be used is a UsageError naming
        --port and giving examples.
        """
        for bad in ["banana", "tcp:notanumber", "tcp:"]:
            with self.assertRaises(usage.UsageError) as e:
                parse("--port", bad)
            self.assertIn("--port", str(e.exception))
            self.assertIn("Examples", str(e.exception))

    def test_rooms(self) -> None:
        """
        --room is repeatable; invalid names are refused.
        """
        self.assertEqual(parse("--room", "a", "-r", "b", "--room", "a")["rooms"], ["a", "b"])
        with self.assertRaises(usage.UsageError) as e:
            parse("--room", "bad name")
        self.assertIn("--room", str(e.exception))

    def test_history(self) -> None:
        """
        --history is an integer from 1 to 100000.
        """
        self.assertEqual(parse("--history", "42")["history"], 42)
        for bad in ["0", "100001", "-3"]:
            with self.assertRaises(usage.UsageError) as e:
                parse("--history", bad)
            self.assertIn("--history", str(e.exception))
        with self.assertRaises(usage.UsageError):
            parse("--history", "lots")

    def test_unknown_option(self) -> None:
        """
        Unknown options are refused.
        """
        with self.assertRaises(usage.UsageError):
            parse("--bogus")

    def test_missing_folder(self) -> None:
        """
        A --templates folder that does not exist is refused.
        """
        with self.assertRaises(usage.UsageError) as e:
            parse("--templates", "/nonexistent/chatd")
        self.assertIn("--templates", str(e.exception))


class PluginTests(SynchronousTestCase):
    """
    The twistd dropin.
    """

    def test_plugin_found(self) -> None:
        """
        twistd finds the chatd IServiceMaker, which names chatd.tap.
        """
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("chatd", makers)
        self.assertIsInstance(makers["chatd"].options(), tap.Options)


class ServiceTests(TestCase):
    """
    makeService builds a service that listens where --port says.
    """

    async def get(self, path: str, request: bytes) -> bytes:
        received: Deferred = Deferred()

        class Get(Protocol):
            def connectionMade(self) -> None:
                self.data = b""
                self.transport.write(request)

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: object) -> None:
                received.callback(self.data)

        await connectProtocol(UNIXClientEndpoint(reactor, path), Get())
        return await received

    async def test_listen_queue(self) -> None:
        """
        The listening socket's queue is the one asked for: 1024 by
        default (the kernel shows it as a listening socket's Send-Q).
        """
        from twisted.internet.utils import getProcessOutput

        from tests._support import start_chatd

        for args, expected in [((), "1024"), (("--port", "tcp:0:interface=127.0.0.1:backlog=77"), "77")]:
            service, base = await start_chatd(self, "--store", "memory:", *args)
            port = base.rsplit(":", 1)[1]
            out = await getProcessOutput("/usr/bin/ss", ["-ltnH", f"sport = :{port}"])
            self.assertEqual(out.split()[2].decode(), expected, out)
            await service.stopService()

    async def test_listens_on_unix_socket(self) -> None:
        """
        With a unix: endpoint the service answers HTTP on that socket, and
        stops cleanly.  It listens in privilegedStartService (so that
        twistd --uid can give up root after binding port 80), and until the
        store is open and the rooms loaded every request but /healthz is a
        503 not_ready.
        """
        path = self.mktemp() + ".sock"
        service = tap.makeService(
            parse("--port", f"unix:{path}", "--room", "dev", "--store", "memory:"), reactor
        )
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(service.ports), 1, "not listening after privilegedStartService")
        early = await self.get(path, b"GET /api/rooms HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(early.startswith(b"HTTP/1.0 503"), early)
        self.assertIn(b'"error":"not_ready"', early)
        self.assertIn(b"Retry-After: 1", early)
        alive = await self.get(path, b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(alive.startswith(b"HTTP/1.0 200"), alive)
        ready = await self.get(path, b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(ready.startswith(b"HTTP/1.0 503"), ready)
        self.assertEqual(service.core.rooms(), [], "rooms loaded before startService")
        service.startService()
        await service.ready
        self.assertEqual([r.name for r in service.core.rooms()], ["dev", "lobby"])
        answer = await self.get(path, b"GET /api/rooms HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer)
        self.assertIn(b'"name":"dev"', answer)
        await service.stopService()


class RetentionTests(SynchronousTestCase):
    """
    --retain-days prunes in the background on a timer.
    """

    def test_old_messages_pruned(self) -> None:
        """
        Messages older than the retention period disappear from the store
        and from memory; an old cursor then gets a reset.
        """
        clock = MemoryReactorClock()
        clock.advance(1_700_000_000)
        service = tap.makeService(
            parse("--store", "memory:", "--retain-days", "2", "--port", "tcp:0"), clock
        )
        service.startService()
        clock.run()  # chatd starts once the reactor runs
        self.addCleanup(service.stopService)
        core = service.core
        self.successResultOf(core.post("lobby", "a", "old"))
        clock.advance(86400)
        self.successResultOf(core.post("lobby", "a", "newer"))
        # (A read before the pruning, which the room keeps, must not outlive it.)
        self.assertEqual(len(self.successResultOf(core.read("lobby", 0, 10)).messages), 2)
        clock.advance(86400 + tap.RETENTION_INTERVAL)
        batch = self.successResultOf(core.read("lobby", 0, 10))
        self.assertEqual([m.body for m in batch.messages], ["newer"])
        self.assertEqual((batch.reset, batch.first_seq), (True, 2))
        clock.advance(86400)
        batch = self.successResultOf(core.read("lobby", 0, 10))
        self.assertEqual((batch.messages, batch.first_seq), ([], 3))

    def test_no_retention_by_default(self) -> None:
        """
        Without --retain-days nothing is ever pruned.
        """
        clock = MemoryReactorClock()
        service = tap.makeService(parse("--store", "memory:", "--port", "tcp:0"), clock)
        service.startService()
        clock.run()  # chatd starts once the reactor runs
        self.addCleanup(service.stopService)
        self.successResultOf(service.core.post("lobby", "a", "old"))
        clock.advance(86400 * 365)
        self.assertEqual(len(self.successResultOf(service.core.read("lobby", 0, 10)).messages), 1)

    def test_negative_days(self) -> None:
        """
        --retain-days below 0 is refused.
        """
        with self.assertRaises(usage.UsageError):
            parse("--retain-days", "-1")
