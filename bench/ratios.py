"""The ratios ``make bench`` reports: one line per compared pair.

Adding a row and its ratio is one line each: the row (``@row(NAME, ..., baseline=BASE)``
in ``bench/rows.py``: every row's ``baseline=`` is a ratio already) and, for a target, a
second baseline or the README headline, one :class:`Ratio` line below. A line whose row
or baseline is not defined yet is skipped with a note (so a line can land before its
row); a line whose rows are defined but were not run (``--only``) is skipped quietly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    """``tps(row) / tps(baseline)``, per concurrency, over the rounds of one run."""

    row: str
    baseline: str
    #: The target the README quotes (None: reported, no target).
    target: float | None = None
    #: In the report's headline (with the coordinator's CPU per transaction).
    headline: bool = False

    @property
    def name(self) -> str:
        return f"{self.row}/{self.baseline}"


#: Every ratio the README quotes, in the order its table lists them.
RATIOS: tuple[Ratio, ...] = (
    Ratio("2pc", "baseline-2pc", target=0.85, headline=True),
    Ratio("2pc-stream", "baseline-2pc", target=1.5, headline=True),
    Ratio("2pc-stream-client", "baseline-2pc", target=1.5, headline=True),  # s-session
    Ratio("2pc-2coord-stream", "baseline-2pc"),
    Ratio("2pc-2coord", "2pc-etcd"),
    Ratio("2pc-2coord-stream", "2pc-stream"),
    Ratio("2pc-nodb", "baseline-2pc"),
    Ratio("2pc-static", "baseline-2pc"),
    Ratio("saga", "baseline-saga", target=0.8, headline=True),
    Ratio("saga-stream", "baseline-saga", target=0.8, headline=True),
    Ratio("2pc-etcd", "2pc-static", target=0.95),
    Ratio("2pc-traced", "2pc", target=0.85),
    Ratio("2pc-traced-sampled", "2pc"),  # s-trace
    Ratio("2pc-subscribed", "2pc", target=0.95),
    Ratio("2pc-tls", "2pc"),
    Ratio("2pc-pg", "2pc"),
)


@dataclass(frozen=True)
class Skipped:
    name: str
    note: str


def ratio_pairs(
    defined: Mapping[str, str | None],
    ran: Iterable[str],
    table: Iterable[Ratio] = RATIOS,
) -> tuple[list[Ratio], list[Skipped]]:
    """The ratios of a run whose rows are ``ran``: the table's lines, then every row's own
    ``baseline=`` not in the table. ``defined``: every defined row -> its baseline."""
    ran = set(ran)
    out: list[Ratio] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    own = [Ratio(r, b) for r, b in defined.items() if b is not None]
    for q in (*table, *own):
        if q.name in seen:
            continue
        seen.add(q.name)
        missing = [n for n in (q.row, q.baseline) if n not in defined]
        if missing:
            skipped.append(Skipped(q.name, f"row {' and '.join(missing)} not defined yet"))
        elif q.row not in ran or q.baseline not in ran:
            skipped.append(Skipped(q.name, "not run (--only)"))
        else:
            out.append(q)
    return out, skipped


def bare_of(row: str, defined: Mapping[str, str | None]) -> str:
    """The bare pattern a row is measured against in the end: its baseline's baseline ...
    (``2pc-traced`` -> ``2pc`` -> ``baseline-2pc``); a row with none is its own."""
    seen = {row}
    while (base := defined.get(row)) is not None and base not in seen:
        seen.add(base)
        row = base
    return row
