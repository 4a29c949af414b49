"""
chatd's benchmarks.  Each module runs on its own: python -m bench.NAME --help.
"""
