"""The offline checker: a chaos history, the participants' databases (ledger, branch
rows, barrier rows, audit), the initial balances and the coordinators' final transaction
lists in; a :class:`Report` of invariant violations out.

Like Jepsen's checkers it trusts nothing it can cross-check: the client's answer (the
history), the coordinator's word (its final list) and the participants' durable rows
must tell one story. Each violation names its invariant, says what is wrong and carries
its evidence (history lines, audit rows, ledger entries); the report shows, per
invariant, the violation with the least evidence (the smallest example).

Invariants (``Violation.name``):

- ``atomicity`` — no 2PC transaction committed at one participant and aborted at
  another, or decided one way by its coordinator and applied the other way at a
  participant; once committed anywhere, every branch of it committed; nothing left
  PREPARED at quiescence.
- ``client-agreement`` — ``ok`` ⇒ committed (2PC) / completed (saga) everywhere;
  ``fail`` ⇒ nothing applied (2PC: no branch committed, no ledger entry; saga: every
  executed step compensated).
- ``durability`` — every effect of every ``ok`` is still in the ledger, with its account
  and amount; every effect a participant acknowledged in its audit has its ledger entry.
- ``saga-completeness`` — every saga completed (all steps, nothing compensated) or
  compensated (every executed step, in reverse dependency order: a step's compensation
  never before one of a step depending on it), or STUCK (listed in the report, not a
  violation); never half-done.
- ``exactly-once`` — each (gid, branch, op) took effect at most once (audit), each
  ledger effect exists once across all participants, and every ledger effect has its
  barrier row (and audit row): no effect bypassed the barrier.
- ``no-compensation-after-pivot`` — a saga whose pivot step executed compensates
  nothing; a pivot is never compensated.
- ``bank-conservation`` — each balance = initial + its ledger entries (and the ledger's
  running ``balance_after`` agrees); no negative balance; nothing ``held`` at quiescence;
  each transaction moved exactly what it asked for (the net of a committed or completed
  transfer is its request's, of an aborted or compensated one zero); the sum of all
  balances is the initial sum plus those nets (constant for balanced transfers).
- ``idempotency-key`` — one idempotency key, at most one gid.
- ``bounded-recovery`` — the history reached quiescence within the bound after the last
  heal; a transaction under way at the last heal settled at every participant within the
  bound after it (audit times); no transaction unsettled at a coordinator at quiescence;
  every ``info`` operation resolved.
- ``history`` — the history itself is well formed (one completion per invocation, per
  process; ``ok`` names its gid; time never goes back).

Evidence the checker cannot have is not held against the system: a coordinator forgets
finished transactions after a restart (the final list is partial), so absence from it is
no violation, and a service without a database (no ``--db``) is skipped with a note.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord.participants import AuditRow, Outcome
from accord.tools.chaos._final import (
    BranchRow,
    CoordinatorTxn,
    LedgerEntry,
    ParticipantState,
    load_participant,
    merge_coordinator_lists,
)
from accord.tools.chaos._history import (
    Completion,
    Event,
    Fault,
    HistoryError,
    Invoke,
    Quiescent,
    SagaStepSpec,
    TransferBranch,
    parse_saga,
    parse_transfer,
    read_history,
)

ATOMICITY = "atomicity"
CLIENT_AGREEMENT = "client-agreement"
DURABILITY = "durability"
SAGA_COMPLETENESS = "saga-completeness"
EXACTLY_ONCE = "exactly-once"
NO_COMPENSATION_AFTER_PIVOT = "no-compensation-after-pivot"
BANK_CONSERVATION = "bank-conservation"
IDEMPOTENCY_KEY = "idempotency-key"
BOUNDED_RECOVERY = "bounded-recovery"
HISTORY = "history"

#: Every invariant, in report order.
CHECKS: tuple[str, ...] = (
    ATOMICITY,
    CLIENT_AGREEMENT,
    DURABILITY,
    SAGA_COMPLETENESS,
    EXACTLY_ONCE,
    NO_COMPENSATION_AFTER_PIVOT,
    BANK_CONSERVATION,
    IDEMPOTENCY_KEY,
    BOUNDED_RECOVERY,
    HISTORY,
)

#: Default bound on the time from the last heal to quiescence.
DEFAULT_RECOVERY_BOUND_S = 60.0

#: The bank's ledger sign of each operation (2PC operations, saga actions and
#: compensations); an operation not here (``balance``) moves no money.
_SIGNS = {"debit": -1, "credit": 1, "refund": 1, "uncredit": -1}

_COMMIT_OPS = frozenset({"commit", "one_phase_commit"})
_COMMITTED_DECISIONS = frozenset({"COMMITTED", "COMMITTING"})
_ABORTED_DECISIONS = frozenset({"ABORTED", "ABORTING"})
#: Audit outcomes that change a branch (a duplicate, conflict or fenced call changes nothing).
_CHANGES = frozenset(Outcome) - {Outcome.DUPLICATE, Outcome.CONFLICT, Outcome.FENCED}
#: Audit outcomes that answer a Compensate for the first time (its place in the order).
_COMPENSATION_ANSWERS = frozenset({Outcome.COMPENSATED, Outcome.NULL_COMPENSATION, Outcome.NOOP})


@dataclass(frozen=True, kw_only=True)
class Violation:
    """One broken invariant, with its evidence."""

    name: str
    message: str
    gid: str | None = None
    key: str | None = None
    #: History lines (as written, plus ``line``).
    history: tuple[Mapping[str, Any], ...] = ()
    #: Audit rows (``AuditRow.to_dict()`` plus ``participant``).
    audit: tuple[Mapping[str, Any], ...] = ()
    #: Ledger entries (plus ``participant``).
    ledger: tuple[Mapping[str, Any], ...] = ()
    #: The coordinator's final word on the transaction, when it had one.
    coordinator: Mapping[str, Any] | None = None

    @property
    def size(self) -> int:
        """How much evidence it takes to see it (smaller is a better example)."""
        return len(self.history) + len(self.audit) + len(self.ledger)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "message": self.message,
            "gid": self.gid,
            "key": self.key,
            "history": [dict(h) for h in self.history],
            "audit": [dict(a) for a in self.audit],
            "ledger": [dict(e) for e in self.ledger],
            "coordinator": None if self.coordinator is None else dict(self.coordinator),
        }


@dataclass(frozen=True, kw_only=True)
class Report:
    violations: tuple[Violation, ...]
    #: Counts: operations by outcome, transactions by final outcome, faults by kind...
    stats: Mapping[str, Any]
    #: Sagas left STUCK for an operator (reported, not violations).
    stuck: tuple[Mapping[str, Any], ...] = ()
    #: What could not be checked, and why.
    notes: tuple[str, ...] = ()
    recovery_bound_s: float = DEFAULT_RECOVERY_BOUND_S
    checks: tuple[str, ...] = CHECKS

    @property
    def valid(self) -> bool:
        return not self.violations

    def by_name(self) -> dict[str, list[Violation]]:
        out: dict[str, list[Violation]] = {name: [] for name in self.checks}
        for v in self.violations:
            out.setdefault(v.name, []).append(v)
        return out

    def smallest(self, name: str) -> Violation | None:
        """The violation of ``name`` with the least evidence (ties: the first found); one
        with no evidence at all (a sum, a missing event) only when there is no other."""
        found = [v for v in self.violations if v.name == name]
        return min(found, key=lambda v: (v.size == 0, v.size)) if found else None

    def to_dict(self) -> dict[str, Any]:
        by_name = self.by_name()
        return {
            "valid": self.valid,
            "checks": {name: len(by_name.get(name, [])) for name in self.checks},
            "violations": [v.to_dict() for v in self.violations],
            "examples": {
                name: example.to_dict()
                for name in self.checks
                if (example := self.smallest(name)) is not None
            },
            "stuck": [dict(s) for s in self.stuck],
            "stats": dict(self.stats),
            "notes": list(self.notes),
            "recovery_bound_s": self.recovery_bound_s,
        }


@dataclass
class ClientOp:
    """One client operation: its invocation and (unless the history ended first) its
    completion."""

    invoke: Invoke
    completion: Completion | None = None
    #: The gid it is about (its completion's, or the only one known for its key).
    gid: str | None = None

    @property
    def outcome(self) -> str:
        return "info" if self.completion is None else self.completion.type

    @property
    def key(self) -> str:
        return self.invoke.key

    def lines(self) -> list[dict[str, Any]]:
        out = [{**self.invoke.to_dict(), "line": self.invoke.line}]
        if self.completion is not None:
            out.append({**self.completion.to_dict(), "line": self.completion.line})
        return out


@dataclass(frozen=True, kw_only=True)
class _Expected:
    """A ledger effect a branch or step has when it took effect."""

    participant: str
    branch_id: str
    account: str
    delta: int | None


@dataclass
class _Txn:
    """Everything known about one gid."""

    gid: str
    ops: list[ClientOp] = field(default_factory=list)
    coordinator: CoordinatorTxn | None = None
    transfer: tuple[TransferBranch, ...] | None = None
    saga: tuple[SagaStepSpec, ...] | None = None
    #: (participant, branch row) for 2PC branches.
    branches: list[tuple[str, BranchRow]] = field(default_factory=list)
    audit: list[tuple[str, AuditRow]] = field(default_factory=list)
    ledger: list[tuple[str, LedgerEntry]] = field(default_factory=list)
    barrier: set[tuple[str, str, str, str]] = field(default_factory=set)

    def coordinator_settled(self) -> bool:
        """True when no coordinator reports it, or one reports it settled."""
        return self.coordinator is None or self.coordinator.settled

    @property
    def is_saga(self) -> bool:
        if self.saga is not None:
            return True
        if self.transfer is not None:
            return False
        if self.coordinator is not None:
            return self.coordinator.saga
        if self.branches:
            return False
        return any(row.op in ("execute", "compensate") for _, row in self.audit) or bool(
            self.ledger
        )


def check(
    history: Sequence[Event] | Path | str,
    *,
    databases: Mapping[str, ParticipantState | Path | str],
    initial: Mapping[str, int],
    coordinator_state: Sequence[Mapping[str, Any]]
    | Sequence[Sequence[Mapping[str, Any]]]
    | Sequence[CoordinatorTxn] = (),
    recovery_bound_s: float = DEFAULT_RECOVERY_BOUND_S,
) -> Report:
    """Checks a history against the final state.

    ``history``: the events, or the path of a JSONL history file. ``databases``: each
    participant *service* name (as the requests name it) and its database (a path, read
    read-only, or an already loaded :class:`ParticipantState`). ``initial``: every
    account's initial balance. ``coordinator_state``: the coordinators' final
    transaction lists (``TxnResult.to_dict()`` objects; one list, or one list per
    coordinator, merged)."""
    events = read_history(history) if isinstance(history, (str, Path)) else list(history)
    participants = {
        name: db if isinstance(db, ParticipantState) else load_participant(name, db)
        for name, db in databases.items()
    }
    return _Checker(
        events, participants, dict(initial), _coordinator_txns(coordinator_state), recovery_bound_s
    ).run()


def _coordinator_txns(
    state: Sequence[Mapping[str, Any]]
    | Sequence[Sequence[Mapping[str, Any]]]
    | Sequence[CoordinatorTxn],
) -> list[CoordinatorTxn]:
    items = list(state)
    if all(isinstance(t, CoordinatorTxn) for t in items):
        return [t for t in items if isinstance(t, CoordinatorTxn)]
    lists: list[Sequence[Mapping[str, Any]]] = []
    for item in items:
        if isinstance(item, Mapping):
            lists.append([item])
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            lists.append([t for t in item if isinstance(t, Mapping)])
    return merge_coordinator_lists(lists)


class _Checker:
    def __init__(
        self,
        events: list[Event],
        participants: dict[str, ParticipantState],
        initial: dict[str, int],
        coordinator: list[CoordinatorTxn],
        bound_s: float,
    ) -> None:
        self.events = events
        self.dbs = participants
        self.initial = initial
        self.bound_s = bound_s
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.stuck: list[dict[str, Any]] = []
        self.coordinator = {t.gid: t for t in coordinator}
        self.ops: list[ClientOp] = []
        self.faults: list[Fault] = []
        self.quiescent: Quiescent | None = None
        self.txns: dict[str, _Txn] = {}
        self.key_gids: dict[str, set[str]] = defaultdict(set)

    # -- building the model -------------------------------------------------------------

    def run(self) -> Report:
        self._read_history()
        self._index()
        self._check_idempotency()
        self._check_atomicity()
        self._check_client_agreement()
        self._check_durability()
        self._check_sagas()
        self._check_exactly_once()
        self._check_pivot()
        self._check_conservation()
        self._check_recovery()
        order = {name: i for i, name in enumerate(CHECKS)}
        violations = sorted(
            self.violations, key=lambda v: (order.get(v.name, len(order)), v.gid or "")
        )
        return Report(
            violations=tuple(violations),
            stats=self._stats(),
            stuck=tuple(self.stuck),
            notes=tuple(self.notes),
            recovery_bound_s=self.bound_s,
        )

    def _read_history(self) -> None:
        pending: dict[int, ClientOp] = {}
        last_time: int | None = None
        for event in self.events:
            if last_time is not None and event.time < last_time:
                self._violate(
                    HISTORY,
                    f"time goes back at line {event.line}: {event.time} < {last_time}",
                    history=[{**event.to_dict(), "line": event.line}],
                )
            last_time = event.time if last_time is None else max(last_time, event.time)
            if isinstance(event, Invoke):
                old = pending.pop(event.process, None)
                if old is not None:
                    self._violate(
                        HISTORY,
                        f"process {event.process} invoked {event.key!r} while {old.key!r} was"
                        " still in flight (one operation per process)",
                        key=event.key,
                        history=[*old.lines(), {**event.to_dict(), "line": event.line}],
                    )
                op = ClientOp(invoke=event)
                self.ops.append(op)
                pending[event.process] = op
            elif isinstance(event, Completion):
                op_or_none = pending.get(event.process)
                line = {**event.to_dict(), "line": event.line}
                if op_or_none is None or op_or_none.key != event.key:
                    self._violate(
                        HISTORY,
                        f"{event.type} of {event.key!r} by process {event.process} matches no"
                        " invocation in flight",
                        key=event.key,
                        history=[*(op_or_none.lines() if op_or_none else []), line],
                    )
                    continue
                del pending[event.process]
                op_or_none.completion = event
                if event.type == "ok" and event.gid is None:
                    self._violate(
                        HISTORY,
                        f"ok of {event.key!r} names no gid",
                        key=event.key,
                        history=op_or_none.lines(),
                    )
            elif isinstance(event, Fault):
                self.faults.append(event)
            else:
                self.quiescent = event

    def _index(self) -> None:
        for op in self.ops:
            c = op.completion
            if c is not None and c.gid is not None:
                self.key_gids[op.key].add(c.gid)
        for txn in self.coordinator.values():
            if txn.idempotency_key:
                self.key_gids[txn.idempotency_key].add(txn.gid)
            self._txn(txn.gid).coordinator = txn
        for op in self.ops:
            c = op.completion
            gids = self.key_gids.get(op.key, set())
            if c is not None and c.gid is not None:
                op.gid = c.gid
            elif len(gids) == 1 and op.outcome != "fail":
                # A fail without a gid was refused before anything was logged (or its
                # key belongs to another request: ALREADY_EXISTS): nothing to link.
                op.gid = next(iter(gids))
            if op.gid is None:
                continue
            t = self._txn(op.gid)
            t.ops.append(op)
            if t.transfer is None and t.saga is None:
                try:
                    if op.invoke.op == "transfer":
                        t.transfer = parse_transfer(op.invoke.request)
                    else:
                        t.saga = parse_saga(op.invoke.request)
                except HistoryError as err:
                    self._violate(HISTORY, str(err), gid=op.gid, key=op.key, history=op.lines())
        for name, db in self.dbs.items():
            for row in db.branches:
                self._txn(row.gid).branches.append((name, row))
            for a in db.audit:
                self._txn(a.gid).audit.append((name, a))
            for e in db.ledger:
                self._txn(e.gid).ledger.append((name, e))
            for r in db.barrier:
                self._txn(r.gid).barrier.add((name, r.branch_id, r.op, r.status))
            if not db.has_audit:
                self.notes.append(f"{name}: no accord_audit table (audit checks skipped)")
        services: set[str] = set()
        for t in self.txns.values():
            for b in t.transfer or ():
                services.add(b.service)
            for s in t.saga or ():
                services.add(s.service)
        for missing in sorted(services - set(self.dbs)):
            self.notes.append(f"service {missing!r} has no database (--db): its effects unchecked")

    def _txn(self, gid: str) -> _Txn:
        t = self.txns.get(gid)
        if t is None:
            t = self.txns[gid] = _Txn(gid=gid)
        return t

    # -- evidence -----------------------------------------------------------------------

    def _violate(
        self,
        name: str,
        message: str,
        *,
        gid: str | None = None,
        key: str | None = None,
        history: Iterable[Mapping[str, Any]] = (),
        audit: Iterable[Mapping[str, Any]] = (),
        ledger: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        self.violations.append(
            Violation(
                name=name,
                message=message,
                gid=gid,
                key=key,
                history=tuple(history),
                audit=tuple(audit),
                ledger=tuple(ledger),
                coordinator=None
                if gid is None or gid not in self.coordinator
                else self.coordinator[gid].to_dict(),
            )
        )

    def _violate_txn(
        self, name: str, t: _Txn, reasons: Sequence[str], *, ops: Sequence[ClientOp] | None = None
    ) -> None:
        """One violation of ``name`` for transaction ``t`` with all its evidence."""
        if not reasons:
            return
        chosen = t.ops if ops is None else ops
        keys = sorted({op.key for op in chosen})
        self._violate(
            name,
            f"{t.gid}: " + "; ".join(reasons),
            gid=t.gid,
            key=keys[0] if keys else None,
            history=[line for op in chosen for line in op.lines()],
            audit=[{**row.to_dict(), "participant": p} for p, row in t.audit],
            ledger=[{**e.to_dict(), "participant": p} for p, e in t.ledger],
        )

    def _expected_transfer(self, t: _Txn) -> list[_Expected]:
        assert t.transfer is not None
        known = t.coordinator.branches if t.coordinator is not None else ()
        out = []
        for i, b in enumerate(t.transfer):
            bid = b.branch_id or (known[i].branch_id if i < len(known) else f"b{i + 1}")
            sign = _SIGNS.get(b.operation)
            out.append(
                _Expected(
                    participant=b.service,
                    branch_id=bid,
                    account=b.account,
                    delta=None if sign is None else sign * b.amount,
                )
            )
        return out

    @staticmethod
    def _expected_step(s: SagaStepSpec, *, compensation: bool = False) -> _Expected:
        op = s.compensation if compensation else s.action
        sign = _SIGNS.get(op)
        return _Expected(
            participant=s.service,
            branch_id=f"{s.name}/{s.compensation}" if compensation else s.name,
            account=s.account,
            delta=None if sign is None else sign * s.amount,
        )

    @staticmethod
    def _branch_states(t: _Txn) -> dict[tuple[str, str], str]:
        return {(p, b.branch_id): b.state for p, b in t.branches}

    @staticmethod
    def _ledger_of(t: _Txn) -> dict[tuple[str, str], LedgerEntry]:
        return {(p, e.branch_id): e for p, e in t.ledger}

    def _executed(self, t: _Txn) -> set[str]:
        """Saga steps that took effect (audit EXECUTED, or an action ledger entry)."""
        out = {
            row.branch_id
            for _, row in t.audit
            if row.op == "execute" and row.outcome is Outcome.EXECUTED
        }
        out |= {e.branch_id for _, e in t.ledger if "/" not in e.branch_id}
        return out

    def _compensated(self, t: _Txn) -> set[str]:
        """Saga steps whose compensation took effect."""
        out = {
            row.branch_id
            for _, row in t.audit
            if row.op == "compensate" and row.outcome is Outcome.COMPENSATED
        }
        out |= {e.branch_id.split("/", 1)[0] for _, e in t.ledger if "/" in e.branch_id}
        return out

    def _refused(self, t: _Txn) -> set[str]:
        return {
            row.branch_id
            for _, row in t.audit
            if row.op == "execute" and row.outcome is Outcome.REFUSED
        }

    def _decision(self, t: _Txn) -> str:
        """What the participants applied of a 2PC transaction: committed, aborted,
        mixed, prepared or none."""
        states = set(self._branch_states(t).values())
        if "COMMITTED" in states and "ABORTED" in states:
            return "mixed"
        if "COMMITTED" in states:
            return "committed"
        if "PREPARED" in states:
            return "prepared"
        if "ABORTED" in states:
            return "aborted"
        return "none"

    def _saga_status(self, t: _Txn) -> str:
        """completed, compensated, none (nothing took effect) or half-done."""
        executed, compensated = self._executed(t), self._compensated(t)
        names = {s.name for s in t.saga} if t.saga is not None else None
        if not executed:
            return "none"
        if not compensated:
            if names is not None and executed >= names:
                return "completed"
            if names is None and not self._refused(t):
                return "completed"
            return "half-done"
        return "compensated" if executed <= compensated else "half-done"

    # -- the checks ---------------------------------------------------------------------

    def _check_idempotency(self) -> None:
        for key, gids in sorted(self.key_gids.items()):
            if len(gids) < 2:
                continue
            ops = [op for op in self.ops if op.key == key]
            coordinator = [
                t.to_dict() for t in self.coordinator.values() if t.idempotency_key == key
            ]
            self._violate(
                IDEMPOTENCY_KEY,
                f"idempotency key {key!r} maps to {len(gids)} transactions: {sorted(gids)}"
                + (f" (coordinator: {coordinator})" if coordinator else ""),
                key=key,
                history=[line for op in ops for line in op.lines()],
            )

    def _check_atomicity(self) -> None:
        for t in self.txns.values():
            if t.is_saga or not (t.branches or t.transfer is not None):
                continue
            states = self._branch_states(t)
            committed = sorted(f"{b}@{p}" for (p, b), s in states.items() if s == "COMMITTED")
            aborted = sorted(f"{b}@{p}" for (p, b), s in states.items() if s == "ABORTED")
            prepared = sorted(f"{b}@{p}" for (p, b), s in states.items() if s == "PREPARED")
            reasons = []
            if committed and aborted:
                reasons.append(f"committed at {committed} but aborted at {aborted}")
            if prepared:
                reasons.append(f"still PREPARED at quiescence at {prepared}")
            if committed and t.transfer is not None:
                for exp in self._expected_transfer(t):
                    if exp.participant not in self.dbs:
                        continue
                    state = states.get((exp.participant, exp.branch_id))
                    if state is None:
                        reasons.append(
                            f"committed at {committed} but branch {exp.branch_id} at"
                            f" {exp.participant} was never prepared"
                        )
            decided = t.coordinator.state if t.coordinator is not None else None
            if decided in _COMMITTED_DECISIONS and aborted:
                reasons.append(f"the coordinator decided {decided} but {aborted} aborted")
            if decided in _ABORTED_DECISIONS and committed:
                reasons.append(f"the coordinator decided {decided} but {committed} committed")
            self._violate_txn(ATOMICITY, t, reasons)

    def _check_client_agreement(self) -> None:
        for op in self.ops:
            if op.outcome not in ("ok", "fail") or op.gid is None:
                continue
            t = self.txns[op.gid]
            reasons = self._agree_saga(op, t) if op.invoke.op == "saga" else self._agree_2pc(op, t)
            self._violate_txn(CLIENT_AGREEMENT, t, reasons, ops=[op])

    def _agree_2pc(self, op: ClientOp, t: _Txn) -> list[str]:
        reasons = []
        decided = t.coordinator.state if t.coordinator is not None else None
        states = self._branch_states(t)
        if op.outcome == "ok":
            if decided is not None and decided not in _COMMITTED_DECISIONS:
                reasons.append(f"client told ok, the coordinator says {decided}")
            if t.transfer is not None:
                for exp in self._expected_transfer(t):
                    if exp.participant not in self.dbs:
                        continue
                    state = states.get((exp.participant, exp.branch_id))
                    if state not in ("COMMITTED", "READ_ONLY"):
                        reasons.append(
                            f"client told ok, branch {exp.branch_id} at {exp.participant} is"
                            f" {state or 'unknown there'}"
                        )
        else:
            if decided in _COMMITTED_DECISIONS:
                reasons.append(f"client told fail, the coordinator says {decided}")
            committed = sorted(f"{b}@{p}" for (p, b), s in states.items() if s == "COMMITTED")
            if committed:
                reasons.append(f"client told fail, committed at {committed}")
            if t.ledger:
                reasons.append(f"client told fail, {len(t.ledger)} ledger entries applied")
        return reasons

    def _agree_saga(self, op: ClientOp, t: _Txn) -> list[str]:
        reasons = []
        decided = t.coordinator.state if t.coordinator is not None else None
        executed, compensated = self._executed(t), self._compensated(t)
        if op.outcome == "ok":
            if decided is not None and decided != "COMPLETED":
                reasons.append(f"client told ok, the coordinator says {decided}")
            if t.saga is not None:
                missing = sorted(
                    s.name for s in t.saga if s.service in self.dbs and s.name not in executed
                )
                if missing:
                    reasons.append(f"client told ok, steps {missing} never executed")
            if compensated:
                reasons.append(f"client told ok, steps {sorted(compensated)} compensated")
        else:
            if decided is not None and decided not in ("COMPENSATED", "ABORTED"):
                reasons.append(f"client told fail, the coordinator says {decided}")
            left = sorted(executed - compensated)
            if left:
                reasons.append(f"client told fail, steps {left} executed and not compensated")
        return reasons

    def _check_durability(self) -> None:
        for t in self.txns.values():
            reasons = []
            ledger = self._ledger_of(t)
            oks = [op for op in t.ops if op.outcome == "ok"]
            expected: list[_Expected] = []
            if oks and t.transfer is not None:
                expected = self._expected_transfer(t)
            elif oks and t.saga is not None:
                expected = [self._expected_step(s) for s in t.saga]
            for exp in expected:
                if exp.participant not in self.dbs or exp.delta is None:
                    continue
                entry = ledger.get((exp.participant, exp.branch_id))
                if entry is None:
                    reasons.append(
                        f"client told ok, the ledger of {exp.participant} has no entry"
                        f" {exp.branch_id} ({exp.delta:+d} on {exp.account})"
                    )
                elif entry.account != exp.account or entry.delta != exp.delta:
                    reasons.append(
                        f"client told ok, ledger entry {exp.branch_id} at {exp.participant} is"
                        f" {entry.delta:+d} on {entry.account}, expected {exp.delta:+d} on"
                        f" {exp.account}"
                    )
            reasons.extend(self._acknowledged_without_ledger(t, ledger))
            self._violate_txn(DURABILITY, t, reasons, ops=oks or t.ops)

    def _acknowledged_without_ledger(
        self, t: _Txn, ledger: Mapping[tuple[str, str], LedgerEntry]
    ) -> list[str]:
        """Effects a participant acknowledged (audit) that its ledger does not hold."""
        operations = {(p, b.branch_id): b.operation for p, b in t.branches}
        prefixes = {(p, e.branch_id.split("/", 1)[0]) for p, e in t.ledger if "/" in e.branch_id}
        out = []
        for p, row in t.audit:
            where = (p, row.branch_id)
            if row.outcome is Outcome.COMMITTED and row.op in _COMMIT_OPS:
                if operations.get(where) in _SIGNS and where not in ledger:
                    out.append(f"{p} acknowledged commit of {row.branch_id}, no ledger entry")
            elif row.outcome is Outcome.EXECUTED and where not in ledger:
                out.append(f"{p} acknowledged execute of {row.branch_id}, no ledger entry")
            elif row.outcome is Outcome.COMPENSATED and where not in prefixes:
                out.append(f"{p} acknowledged compensate of {row.branch_id}, no ledger entry")
        return out

    def _check_sagas(self) -> None:
        for t in self.txns.values():
            if not t.is_saga:
                continue
            reasons = []
            status = self._saga_status(t)
            decided = t.coordinator.state if t.coordinator is not None else None
            executed, compensated = self._executed(t), self._compensated(t)
            if decided == "STUCK":
                self.stuck.append(
                    {
                        "gid": t.gid,
                        "keys": sorted({op.key for op in t.ops}),
                        "reason": t.coordinator.reason if t.coordinator else "",
                        "executed": sorted(executed),
                        "compensated": sorted(compensated),
                    }
                )
            else:
                if decided is not None and not t.coordinator_settled():
                    reasons.append(f"the coordinator left it {decided} at quiescence")
                if status == "half-done":
                    reasons.append(
                        f"half-done: executed {sorted(executed)}, compensated"
                        f" {sorted(compensated)}"
                        + (f", refused {sorted(self._refused(t))}" if self._refused(t) else "")
                    )
                if decided == "COMPLETED" and status not in ("completed",):
                    reasons.append(f"the coordinator says COMPLETED, participants show {status}")
                if decided == "COMPENSATED" and status not in ("compensated", "none"):
                    reasons.append(f"the coordinator says COMPENSATED, participants show {status}")
            never = sorted(compensated - executed)
            if never:
                reasons.append(f"compensated steps that never executed: {never}")
            reasons.extend(self._compensation_order(t))
            self._violate_txn(SAGA_COMPLETENESS, t, reasons)

    def _compensation_order(self, t: _Txn) -> list[str]:
        """A step's compensation must not come before that of a step depending on it."""
        if t.saga is None:
            return []
        first: dict[str, float] = {}
        for _, row in t.audit:
            if row.op == "compensate" and row.outcome in _COMPENSATION_ANSWERS:
                first[row.branch_id] = min(first.get(row.branch_id, row.at), row.at)
        if not first:
            for _, e in t.ledger:
                if "/" in e.branch_id:
                    step = e.branch_id.split("/", 1)[0]
                    first[step] = min(first.get(step, e.created_at), e.created_at)
        ancestors = _ancestors(t.saga)
        out = []
        for step, before in sorted(ancestors.items()):
            for dep in sorted(before):
                if step in first and dep in first and first[dep] < first[step]:
                    out.append(
                        f"step {dep} compensated before {step}, which depends on it"
                        f" ({first[step] - first[dep]:.3f}s earlier)"
                    )
        return out

    def _check_exactly_once(self) -> None:
        placed: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name, db in self.dbs.items():
            for e in db.ledger:
                placed[(e.gid, e.branch_id)].append(name)
        for t in self.txns.values():
            reasons = []
            counts: dict[tuple[str, str, str], int] = defaultdict(int)
            for p, row in t.audit:
                kind = _effect_kind(row)
                if kind is not None:
                    counts[(p, row.branch_id, kind)] += 1
            for (p, bid, kind), n in sorted(counts.items()):
                if n > 1:
                    reasons.append(f"{kind} of {bid} took effect {n} times at {p}")
            effects = {(p, row.branch_id, _effect_kind(row)) for p, row in t.audit}
            for p, e in t.ledger:
                where = placed[(e.gid, e.branch_id)]
                if len(where) > 1 and where[0] == p:
                    reasons.append(f"ledger effect {e.branch_id} applied at {sorted(where)}")
                step, _, comp = e.branch_id.partition("/")
                if comp:
                    ops = [("compensate", "compensated")]
                else:
                    ops = [("commit", "committed"), ("execute", "executed")]
                if not any((p, step, op, "OK") in t.barrier for op, _ in ops):
                    reasons.append(f"ledger effect {e.branch_id} at {p} has no barrier row")
                if self.dbs[p].has_audit and not any((p, step, k) in effects for _, k in ops):
                    reasons.append(f"ledger effect {e.branch_id} at {p} has no audit row")
            self._violate_txn(EXACTLY_ONCE, t, reasons)

    def _check_pivot(self) -> None:
        for t in self.txns.values():
            if t.saga is None:
                continue
            pivots = {s.name for s in t.saga if s.pivot}
            if not pivots:
                continue
            executed, compensated = self._executed(t), self._compensated(t)
            reasons = []
            if pivots & compensated:
                reasons.append(f"pivot {sorted(pivots & compensated)} compensated")
            if pivots & executed and compensated - pivots:
                reasons.append(
                    f"pivot {sorted(pivots & executed)} executed, yet"
                    f" {sorted(compensated - pivots)} compensated"
                )
            self._violate_txn(NO_COMPENSATION_AFTER_PIVOT, t, reasons)

    def _check_conservation(self) -> None:
        quiet = self.quiescent is not None
        seen_accounts: set[str] = set()
        total = 0
        for name, db in sorted(self.dbs.items()):
            by_account: dict[str, list[LedgerEntry]] = defaultdict(list)
            for e in db.ledger:
                by_account[e.account].append(e)
            for account in sorted(set(db.accounts) | set(by_account)):
                entries = by_account.get(account, [])
                evidence = [{**e.to_dict(), "participant": name} for e in entries]
                a = db.accounts.get(account)
                if a is None:
                    self._violate(
                        BANK_CONSERVATION,
                        f"{account}@{name}: ledger entries for an account that does not exist",
                        ledger=evidence,
                    )
                    continue
                seen_accounts.add(account)
                total += a.balance
                start = self.initial.get(account)
                if start is None:
                    self._violate(
                        BANK_CONSERVATION,
                        f"{account}@{name}: not in the initial balances",
                        ledger=evidence,
                    )
                    start = 0
                self._check_account(name, a.id, a.balance, a.held, start, entries, quiet)
        for account in sorted(set(self.initial) - seen_accounts):
            self._violate(
                BANK_CONSERVATION, f"{account}: in the initial balances but in no database"
            )
        self._check_nets(total)

    def _check_account(
        self,
        participant: str,
        account: str,
        balance: int,
        held: int,
        start: int,
        entries: Sequence[LedgerEntry],
        quiet: bool,
    ) -> None:
        evidence = [{**e.to_dict(), "participant": participant} for e in entries]
        where = f"{account}@{participant}"
        moved = sum(e.delta for e in entries)
        if balance != start + moved:
            self._violate(
                BANK_CONSERVATION,
                f"{where}: balance {balance} != initial {start} + ledger {moved:+d}"
                f" (= {start + moved})",
                ledger=evidence,
            )
        if balance < 0 or held < 0:
            self._violate(BANK_CONSERVATION, f"{where}: negative balance {balance} or held {held}")
        if quiet and held != 0:
            self._violate(BANK_CONSERVATION, f"{where}: {held} still held at quiescence")
        running = start
        for i, e in enumerate(entries):
            running += e.delta
            if e.balance_after != running or e.balance_after < 0:
                self._violate(
                    BANK_CONSERVATION,
                    f"{where}: ledger entry {e.gid}/{e.branch_id} says balance_after"
                    f" {e.balance_after}, initial + entries so far = {running}",
                    gid=e.gid,
                    ledger=evidence[max(0, i - 1) : i + 1],
                )
                break

    def _check_nets(self, total: int) -> None:
        """Each transaction moved what it asked for; the sum follows."""
        expected_total = sum(self.initial.get(a, 0) for a in self._accounts())
        for t in self.txns.values():
            net = sum(e.delta for _, e in t.ledger)
            expected = self._expected_net(t)
            if expected is None:  # a stuck or half-done saga: its net is what it is
                expected_total += net
                continue
            expected_total += expected
            if net != expected:
                self._violate_txn(
                    BANK_CONSERVATION,
                    t,
                    [f"its ledger entries move {net:+d} in total, expected {expected:+d}"],
                )
        if total != expected_total:
            self._violate(
                BANK_CONSERVATION,
                f"sum of balances {total} != {expected_total} (initial"
                f" {sum(self.initial.values())} plus what the transactions asked to move)",
            )

    def _accounts(self) -> set[str]:
        return {a for db in self.dbs.values() for a in db.accounts}

    def _expected_net(self, t: _Txn) -> int | None:
        if t.is_saga:
            status = self._saga_status(t)
            if status in ("none", "compensated"):
                return 0
            if status == "completed" and t.saga is not None:
                return sum(self._expected_step(s).delta or 0 for s in t.saga)
            if status == "completed":
                return 0  # no request known: transfers move money, they do not make it
            return None
        if self._decision(t) in ("committed", "mixed") and t.transfer is not None:
            return sum(e.delta or 0 for e in self._expected_transfer(t))
        return 0

    def _check_recovery(self) -> None:
        q = self.quiescent
        if q is None:
            self._violate(
                BOUNDED_RECOVERY, "the history has no quiescent event: the run never settled"
            )
        elif q.after_heal_s > self.bound_s:
            self._violate(
                BOUNDED_RECOVERY,
                f"quiescence {q.after_heal_s:.1f}s after healing, over the bound of"
                f" {self.bound_s:.1f}s",
                history=[{**q.to_dict(), "line": q.line}],
            )
        heals = [f.wall for f in self.faults if f.fault == "heal"]
        healed = max(heals) if heals else None
        for t in self.txns.values():
            reasons = []
            if t.coordinator is not None and not t.coordinator_settled():
                reasons.append(f"the coordinator still has it {t.coordinator.state}")
            infos = [op for op in t.ops if op.outcome == "info"]
            if infos and not t.is_saga and self._decision(t) == "prepared":
                reasons.append(f"info operation {infos[0].key!r} never resolved: still PREPARED")
            late = self._settled_late(t, healed)
            if late is not None:
                reasons.append(late)
            self._violate_txn(BOUNDED_RECOVERY, t, reasons)

    def _settled_late(self, t: _Txn, healed: float | None) -> str | None:
        """A transaction already under way at the last heal must settle within the bound
        after it: its last change at a participant (audit ``at``, the same machine's wall
        clock as the history's ``wall``) no later than heal + bound."""
        if healed is None:
            return None
        changes = [row.at for _, row in t.audit if row.outcome in _CHANGES]
        if not changes or min(changes) > healed:
            return None  # started after the heal: the workload went on, not recovery
        last = max(changes)
        if last - healed <= self.bound_s:
            return None
        return (
            f"in doubt at the last heal and settled {last - healed:.1f}s after it, over the"
            f" bound of {self.bound_s:.1f}s"
        )

    def _stats(self) -> dict[str, Any]:
        outcomes = {"ok": 0, "fail": 0, "info": 0}
        by_op: dict[str, int] = defaultdict(int)
        for op in self.ops:
            outcomes[op.outcome] += 1
            by_op[op.invoke.op] += 1
        faults: dict[str, int] = defaultdict(int)
        for f in self.faults:
            faults[f.fault] += 1
        # By the coordinator's word when it has one, else by what the participants hold.
        txns: dict[str, int] = defaultdict(int)
        for t in self.txns.values():
            if t.coordinator is not None:
                txns[t.coordinator.state.lower()] += 1
            elif t.is_saga:
                txns[self._saga_status(t)] += 1
            else:
                txns[self._decision(t)] += 1
        return {
            "operations": len(self.ops),
            "outcomes": outcomes,
            "by_op": dict(by_op),
            "unfinished_invocations": sum(1 for op in self.ops if op.completion is None),
            "transactions": len(self.txns),
            "transaction_outcomes": dict(sorted(txns.items())),
            "faults": dict(sorted(faults.items())),
            "participants": sorted(self.dbs),
            "audit_rows": sum(len(db.audit) for db in self.dbs.values()),
            "ledger_entries": sum(len(db.ledger) for db in self.dbs.values()),
            "after_heal_s": None if self.quiescent is None else self.quiescent.after_heal_s,
        }


def _effect_kind(row: AuditRow) -> str | None:
    """What kind of effect an audit row records (None: no effect)."""
    o = row.outcome
    if o is Outcome.COMMITTED and row.op in _COMMIT_OPS:
        return "committed"
    if o is Outcome.ABORTED:
        return "aborted"
    if o is Outcome.EXECUTED:
        return "executed"
    if o in (Outcome.COMPENSATED, Outcome.NULL_COMPENSATION):
        return "compensated"
    if row.op == "prepare" and o in (Outcome.PREPARED, Outcome.READ_ONLY, Outcome.REFUSED):
        return "prepared"
    return None


def _ancestors(steps: Sequence[SagaStepSpec]) -> dict[str, set[str]]:
    """Each step's transitive dependencies."""
    deps = {s.name: set(s.depends_on) for s in steps}
    out: dict[str, set[str]] = {}
    for name in deps:
        seen: set[str] = set()
        todo = list(deps[name])
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(deps.get(d, ()))
        out[name] = seen
    return out


__all__ = [
    "ATOMICITY",
    "BANK_CONSERVATION",
    "BOUNDED_RECOVERY",
    "CHECKS",
    "CLIENT_AGREEMENT",
    "DEFAULT_RECOVERY_BOUND_S",
    "DURABILITY",
    "EXACTLY_ONCE",
    "HISTORY",
    "IDEMPOTENCY_KEY",
    "NO_COMPENSATION_AFTER_PIVOT",
    "SAGA_COMPLETENESS",
    "ClientOp",
    "Report",
    "Violation",
    "check",
]
