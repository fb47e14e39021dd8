"""Benchmarks: ``fedpal bench decode|train|federation|memory|scale|all`` (``cli.py``), each
measuring its contenders side by side in one run (``core.py``); the style suite (``style.py``)."""
