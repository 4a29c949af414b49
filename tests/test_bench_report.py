"""
The benchmark report renders every section and target from JSON lines.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from bench import report


def row(**fields: object) -> dict:
    return {"session": "s1", "run": 1, "cpus": 2, **fields}


class ReportTests(SynchronousTestCase):
    """
    bench.report.report() from a small, made-up session.
    """

    def test_sections_and_ratios(self) -> None:
        """
        Medians with ranges, and target ratios computed side by side.
        """
        rows = []
        for run, (chatd, autobahn) in enumerate([(900, 450), (1000, 500), (1100, 550)], 1):
            for server, value in [("chatd", chatd), ("autobahn", autobahn), ("websockets", 200)]:
                rows.append(
                    row(run=run, bench="fanout", server=server, receivers=100,
                        deliveries_per_s=value, server_us_per_delivery=1.0,
                        server_cpu_s=5.0, loadgen_cpu_s=1.0)
                )
        rows += [
            row(bench="latency", server="chatd", p50_ms=5.0, p99_ms=10.0, max_ms=20.0, undelivered=0,
                server_cpu_s=2.0, loadgen_cpu_s=1.0, loadgen="c"),
            row(bench="latency", server="autobahn", p50_ms=10.0, p99_ms=20.0, max_ms=30.0, undelivered=0,
                server_cpu_s=4.0, loadgen_cpu_s=1.0, loadgen="c"),
            row(bench="latency", server="websockets", p50_ms=8.0, p99_ms=16.0, max_ms=30.0, undelivered=0,
                server_cpu_s=3.0, loadgen_cpu_s=1.0, loadgen="c"),
            row(bench="latency", server="floor", p50_ms=4.0, p99_ms=9.0, max_ms=12.0, undelivered=0,
                server_cpu_s=1.6, server_us_per_delivery=8.0, loadgen_cpu_s=1.0, loadgen="c"),
            row(bench="idle", server="chatd", connections=5000, kib_per_connection=11.5,
                server_ms_per_connect=0.25),
            row(bench="idle", server="autobahn", connections=5000, kib_per_connection=11.5 / 1.25),
            row(bench="longpoll", server="chatd", clients=1000, deliveries_per_s=1.0,
                p50_ms=1.0, p99_ms=2.0, max_ms=3.0, undelivered=0, received=200_000,
                server_cpu_s=4.0, loadgen_cpu_s=2.0, loadgen="c"),
            row(bench="getcost", server="chatd", messages=10, p50_ms=0.3, p99_ms=1.0),
            row(bench="getcost", server="chatd", messages=100_000, p50_ms=0.33, p99_ms=1.0),
            row(bench="store", store="sqlite", messages_per_s=70000),
        ]
        rows.append(
            row(bench="fanout", server="chatd-sqlite", receivers=100, deliveries_per_s=750,
                server_us_per_delivery=1.0, server_cpu_s=5.0, loadgen_cpu_s=1.0)
        )
        rows.append(
            row(bench="longpoll", server="chatd-sqlite", clients=100, deliveries_per_s=1.0,
                p50_ms=1.0, p99_ms=30.0, max_ms=40.0, undelivered=0, received=20_000,
                server_cpu_s=1.0, loadgen_cpu_s=0.5, loadgen="c")
        )
        text = report.report(rows)
        self.assertIn("| chatd (--store memory:) | 100 | 1,000 (900-1,100) |", text)
        self.assertIn("| chatd (default SQLite store) | 100 | 750 (750-750) |", text)
        self.assertIn(
            "| chatd (--store memory:): fan-out R=100 >= 2.0x Autobahn | 2.00x Autobahn, 5.00x websockets |",
            text,
        )
        self.assertIn("| chatd (default SQLite store): fan-out R=100 >= 1.5x Autobahn | 1.50x Autobahn", text)
        self.assertIn(
            "| chatd (--store memory:): latency p99 <= 0.5x websockets', nothing undelivered | 0.62x "
            "(10.0 (10.0-10.0) ms against 16.0 (16.0-16.0) ms), undelivered 0 (0-0); the floor's p99 is "
            "9.0 (9.0-9.0) ms (0.56x websockets'), chatd's 1.11x the floor's |",
            text,
        )
        # The floor has its row in the latency table, with its CPU per delivery.
        self.assertIn("| floor: bare Twisted, one send() per recipient | 4.0 (4.0-4.0) | 9.0 (9.0-9.0) |", text)
        self.assertIn("| 0 (0-0) | 8.0 (8.0-8.0) | 1.60 (1.60-1.60) |", text)
        self.assertIn("1.10x", text)
        self.assertIn("| chatd (--store memory:) | 5000 | 11.50 (11.50-11.50) | 0.25 (0.25-0.25) |", text)
        self.assertIn(
            "| chatd (--store memory:): idle WebSocket <= raw Autobahn's per connection | "
            "11.50 (11.50-11.50) KiB against 9.20 (9.20-9.20) KiB (1.25x) |",
            text,
        )
        # Long-poll: server CPU per request-response cycle, and which load
        # generator ran; latency: server CPU per recipient.
        self.assertIn("| 0 (0-0) | 20.0 (20.0-20.0) | 2.00 (2.00-2.00) | c |", text)
        self.assertIn(
            "| chatd (--store memory:): long-poll, 1000 waiters, p99 < 150 ms, nothing undelivered | "
            "p99 2.0 (2.0-2.0) ms, undelivered 0 (0-0) |",
            text,
        )
        self.assertIn(
            "| chatd (default SQLite store): long-poll, 100 waiters, p99 < 20 ms, nothing undelivered | "
            "p99 30.0 (30.0-30.0) ms",
            text,
        )
        self.assertIn("about 10 µs of server CPU per recipient", text)
        self.assertIn("Autobahn spends 20 µs.", text)
        self.assertIn("20.0 (20.0-20.0) µs of server CPU per cycle that is 40% of the server's", text)

    def test_sse_beside_websocket(self) -> None:
        """
        The SSE fan-out cells are shown beside the WebSocket ones of the
        same run, with their ratio and what was lost (nothing); without
        SSE rows there is no such section.
        """
        rows = [
            row(bench="fanout", server="chatd", receivers=100, deliveries_per_s=400,
                server_us_per_delivery=1.0, server_cpu_s=5.0, loadgen_cpu_s=1.0),
            row(bench="sse", server="chatd", receivers=100, deliveries_per_s=600,
                server_us_per_delivery=0.8, server_cpu_s=5.0, loadgen_cpu_s=1.0,
                undelivered=0, duplicates=0),
        ]
        text = report.report(rows)
        self.assertIn("## Fan-out over Server-Sent Events", text)
        self.assertIn("| chatd (--store memory:) | 100 | 600 (600-600) | 400 (400-400) | 1.50x | 0.80 (0.80-0.80) | 0 |", text)
        self.assertNotIn("Server-Sent Events", report.report(rows[:1]))

    def test_load_newest_session(self) -> None:
        """
        Without --session, the newest session in the file is used.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            for session in ("old", "new"):
                f.write(json.dumps({"session": session, "bench": "store"}) + "\n")
        from pathlib import Path

        self.assertEqual([r["session"] for r in report.load(Path(path), None)], ["new"])


def multinode_rows() -> list:
    """
    Two runs of the multinode and notify cells on both buses, made up.
    """
    rows = []
    for run, extra in ((1, 1.0), (2, 3.0)):
        for bus in ("postgresql", "redis"):
            for nodes in (1, 3):
                slower = extra if nodes == 3 else 0.0
                rows.append(
                    row(run=run, bench="multinode", test="fanout", bus=bus, nodes=nodes, receivers=100,
                        deliveries_per_s=300_000 / nodes, server_us_per_delivery=2.0 * nodes,
                        server_cpu_s=4.0, undelivered=0, duplicates=0, loadgen_cpu_s=1.5)
                )
                rows.append(
                    row(run=run, bench="multinode", test="latency", bus=bus, nodes=nodes, receivers=100,
                        p50_ms=3.0 + slower, p99_ms=10.0 + 10 * slower, max_ms=20.0,
                        remote_p50_ms=-1.0 if nodes == 1 else 4.0, remote_p99_ms=-1.0 if nodes == 1 else 40.0,
                        undelivered=0, duplicates=0, out_of_order=1 if (bus, nodes, run) == ("redis", 3, 2) else 0,
                        server_us_per_delivery=36.0, loadgen="c")
                )
        rows.append(row(run=run, bench="notify", notify="off", writers=8, window=1, seconds=5.0,
                        commits_per_s=1000, writer_cpu_s=2.0))
        rows.append(row(run=run, bench="notify", notify="on", writers=8, window=1, seconds=5.0,
                        commits_per_s=900 - 100 * run, writer_cpu_s=2.0, unannounced=0))
    return rows


class MultinodeReportTests(SynchronousTestCase):
    """
    The multi-node section: one and three nodes per bus, the latency the
    bus adds, and NOTIFY's share of the commit rate.
    """

    def test_tables(self) -> None:
        """
        Each bus and node count has its fan-out and latency rows; one node
        has no other nodes' receivers, shown as n/a rather than -1.
        """
        text = "\n".join(report.multinode_section(multinode_rows()))
        self.assertIn("## Several nodes on one PostgreSQL", text)
        self.assertIn(
            "| PostgreSQL (LISTEN/NOTIFY) | 3 | 100 | 100,000 (100,000-100,000) | 6.00 (6.00-6.00) |", text
        )
        self.assertIn("| Redis (pub/sub) | 1 | 100 | 3.0 (3.0-3.0) | 10.0 (10.0-10.0) | 20.0 (20.0-20.0) | n/a | n/a |",
                      text)
        self.assertIn("| 4.0 (4.0-4.0) | 40.0 (40.0-40.0) | 0 (0-0) | 0 (0-0) | 0 (0-1) |", text)

    def test_added_latency_paired_by_run(self) -> None:
        """
        The bus's added latency is three nodes minus one node within each
        run, summarised over the runs.
        """
        rows = multinode_rows()
        self.assertEqual(report.added_latency(rows, "postgresql", "p50_ms"), (2.0, 1.0, 3.0, 2))
        self.assertEqual(report.added_latency(rows, "redis", "p99_ms"), (20.0, 10.0, 30.0, 2))
        text = "\n".join(report.multinode_section(rows))
        self.assertIn("| PostgreSQL (LISTEN/NOTIFY) | +2.0 (+1.0 to +3.0) | +20.0 (+10.0 to +30.0) |", text)

    def test_added_latency_may_be_negative(self) -> None:
        """
        Three nodes may measure faster than one on a noisy machine: the
        difference keeps its sign rather than reading as a range.
        """
        self.assertEqual(report.signed((-1.25, -13.1, 236.3, 3)), "-1.2 (-13.1 to +236.3)")
        self.assertEqual(report.signed(None), "n/a")

    def test_notify_share(self) -> None:
        """
        NOTIFY's commit rate as a share of the rate without, run by run,
        with its unannounced count.
        """
        rows = multinode_rows()
        self.assertEqual(report.notify_share(rows), (75.0, 70.0, 80.0, 2))
        text = "\n".join(report.multinode_section(rows))
        self.assertIn("| off | 8 | 1,000 (1,000-1,000) | 2.00 (2.00-2.00) | - |", text)
        self.assertIn("| on | 8 | 750 (700-800) | 2.00 (2.00-2.00) | 0 (0-0) |", text)

    def test_targets(self) -> None:
        """
        The targets count every run's undelivered, doubled and reordered
        messages, per bus, and join the full report's Targets table.
        """
        rows = multinode_rows()
        targets = report.multinode_targets(rows)
        self.assertEqual(
            targets,
            [
                "| PostgreSQL (LISTEN/NOTIFY) bus: three nodes add < 5 ms to p50 at 100 receivers, "
                "nothing undelivered | p50 +2.0 (+1.0 to +3.0) ms (p99 +20.0 (+10.0 to +30.0) ms), "
                "not delivered, doubled or out of order 0 (every run) |",
                "| Redis (pub/sub) bus: three nodes add < 5 ms to p50 at 100 receivers, "
                "nothing undelivered | p50 +2.0 (+1.0 to +3.0) ms (p99 +20.0 (+10.0 to +30.0) ms), "
                "not delivered, doubled or out of order 1 (every run) |",
                "| PostgreSQL with NOTIFY commits >= 80% of its rate without | 75 (70-80)% |",
            ],
        )
        full = report.report(rows)
        self.assertIn(targets[0], full)
        self.assertLess(full.index("## Several nodes"), full.index("## Targets"))

    def test_absent(self) -> None:
        """
        A session without the multi-node cells renders no such section
        (docs/benchmarks.md of a run without them stays as it was).
        """
        rows = [row(bench="store", store="sqlite", messages_per_s=70000)]
        self.assertEqual(report.multinode_section(rows), [])
        self.assertEqual(report.multinode_targets(rows), [])
        self.assertNotIn("Several nodes", report.report(rows))


def storm_rows() -> list:
    """
    Three runs of the reconnect storm: chatd on both queues with resume,
    the peers without, made up.
    """
    rows = []
    for run in (1, 2, 3):
        for server, connects, ms, drops, resume in (
            ("chatd-sqlite", 1000 + 100 * run, 0.8, 0, True),
            ("chatd-sqlite-backlog50", 600, 0.7, 900 + run, True),
            ("autobahn", 1500, 0.5, 0, False),
            ("websockets", 2000, 0.25, 0, False),
        ):
            rows.append(
                row(run=run, bench="storm", server=server, resume=resume, clients=10_000, inflight=256,
                    owed=3 if resume else 0, done=10_000, unfinished=0, missed=0,
                    doubled=1 if (server, run) == ("chatd-sqlite", 2) else 0, out_of_order=0,
                    retries=0, opened=10_000, storm_s=10_000 / connects, open_s=10_000 / connects,
                    connects_per_s=connects, p50_ms=100.0, p99_ms=3000.0 if drops else 400.0,
                    max_ms=4000.0, loadgen_cpu_s=0.4, loadgen="c", server_cpu_s=ms * 10,
                    server_ms_per_connect=ms, listen_overflows=drops, listen_drops=drops)
            )
    return rows


class StormReportTests(SynchronousTestCase):
    """
    The reconnect-storm section and its targets.
    """

    def test_table(self) -> None:
        """
        One row per server (chatd's backlog=50 variant beside the default),
        with medians and ranges, whether the clients resumed, and the
        listen-queue drops.
        """
        text = "\n".join(report.storm_section(storm_rows()))
        self.assertIn("## Reconnect storm", text)
        self.assertIn("resumes with `?after=` 3 messages behind", text)
        self.assertIn(
            "| chatd (default SQLite store) | 10,000 | 256 | yes | 8.33 (7.69-9.09) | 1,200 (1,100-1,300) | "
            "0.80 (0.80-0.80) | 8.00 (8.00-8.00) | 0 (0-0) | 0 (0-0) | 400 (400-400) | 0 (0-0) | 0 (0-1) | "
            "0.40 (0.40-0.40) |",
            text,
        )
        self.assertIn(
            "| chatd (default SQLite store, backlog=50) | 10,000 | 256 | yes | 16.67 (16.67-16.67) | "
            "600 (600-600) | 0.70 (0.70-0.70) | 7.00 (7.00-7.00) | 902 (901-903) | 902 (901-903) |",
            text,
        )
        self.assertIn("| websockets (broadcast) | 10,000 | 256 | no |", text)
        lines = text.splitlines()
        order = [i for i, line in enumerate(lines) if line.startswith("| chatd") or line.startswith("| Autobahn")
                 or line.startswith("| websockets")]
        self.assertEqual([lines[i].split(" | ")[0] for i in order],
                         ["| chatd (default SQLite store)", "| chatd (default SQLite store, backlog=50)",
                          "| Autobahn (prepared broadcast)", "| websockets (broadcast)"])

    def test_targets(self) -> None:
        """
        connects/s against websockets', CPU per connect against Autobahn's,
        and every run's missed, doubled, reordered or unfinished clients;
        only for chatd as users run it (not the backlog=50 variant).
        """
        targets = report.storm_targets(storm_rows())
        self.assertEqual(
            targets,
            [
                "| chatd (default SQLite store): storm of 10,000, connects/s >= websockets' | "
                "0.60x (1,200 (1,100-1,300) against 2,000 (2,000-2,000)) |",
                "| chatd (default SQLite store): storm of 10,000, server CPU per connect <= Autobahn's | "
                "1.60x (0.80 (0.80-0.80) ms against 0.50 (0.50-0.50) ms) |",
                "| chatd (default SQLite store): storm of 10,000 caught up in < 10 s, nothing missed or doubled | "
                "8.33 (7.69-9.09) s, missed, doubled, out of order or unfinished 1 (every run) |",
            ],
        )
        full = report.report(storm_rows())
        self.assertIn(targets[0], full)
        self.assertLess(full.index("## Reconnect storm"), full.index("## Targets"))

    def test_absent(self) -> None:
        """
        A session without storm cells renders no such section or targets.
        """
        rows = [row(bench="store", store="sqlite", messages_per_s=70000)]
        self.assertEqual(report.storm_section(rows), [])
        self.assertEqual(report.storm_targets(rows), [])
        self.assertNotIn("Reconnect storm", report.report(rows))
