# -*- test-case-name: tests.test_admin -*-
"""
C{python -m chatd COMMAND}: chatd's commands other than the server, which
runs under twistd (C{twistd -n chatd}).

  - C{admin}: L{chatd.admin}, the same as the C{chatd-admin} script.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Optional, Sequence

__all__ = ["main"]

USAGE = """\
usage: python -m chatd admin COMMAND ...

commands:
  admin    administer a deployment: tokens, accounts, rooms, members,
           API keys, invitations, sessions (python -m chatd admin --help;
           also installed as chatd-admin)

The server itself runs under twistd: twistd -n chatd --help
"""


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """
    Dispatch to a command; without a known one, print the usage on stderr
    and exit with status 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["admin"]:
        # Imported only when asked for.
        from chatd.admin import run

        run(args[1:], prog="python -m chatd admin")
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        sys.exit(0)
    sys.stderr.write(USAGE)
    if args:
        sys.stderr.write(f"python -m chatd: error: unknown command {args[0]!r}\n")
    sys.exit(2)


if __name__ == "__main__":
    main()
