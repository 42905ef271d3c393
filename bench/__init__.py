"""Accord's benchmark harness: ``python -m bench.run --out bench/results.json``.

Each row starts its own topology of real processes on 127.0.0.1 (see :mod:`bench.rows`),
drives it with a closed-loop load generator in this process (:mod:`bench.load`) at several
concurrencies, and the report (:mod:`bench.report`) writes JSON and prints a table. A
ratio is only ever quoted between two rows of the same run.
"""

from __future__ import annotations
