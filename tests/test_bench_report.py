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
            row(bench="idle", server="chatd", connections=5000, kib_per_connection=11.5),
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
            "| chatd (--store memory:): fan-out R=100 >= 1.5x Autobahn | 2.00x Autobahn, 5.00x websockets |",
            text,
        )
        self.assertIn("| chatd (default SQLite store): fan-out R=100 >= 1.5x Autobahn | 1.50x Autobahn", text)
        self.assertIn(
            "| chatd (--store memory:): latency p99 <= 0.5x Autobahn's, nothing undelivered | 0.50x", text
        )
        self.assertIn("1.10x", text)
        self.assertIn("11.5 (11.5-11.5) KiB", text)
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
