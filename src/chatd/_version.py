"""
chatd's version, read by setup.cfg and reported by C{twistd chatd --version}.
"""

__version__ = "0.1.0"
