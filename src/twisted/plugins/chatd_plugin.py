"""
The C{twistd chatd} plugin.  Twisted imports L{chatd.tap} only when the
plugin is used, so C{twistd --help} stays fast.
"""

from twisted.application.service import ServiceMaker

chatd = ServiceMaker(
    "chatd",
    "chatd.tap",
    "A real-time chat server: WebSocket, long-poll (JSON/JSONP) and POST.",
    "chatd",
)
