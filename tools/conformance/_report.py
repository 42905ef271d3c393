"""The kit's bookkeeping: one :class:`Exchange` per call sent (the request and the answer
got), one :class:`RuleResult` per rule, and the :class:`Report` (exit code, JSON, table)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: The codes a participant may answer a well-formed call of the kit with (the result
#: contract of participant.proto): yes/done, a business no, "not yet".
CONTRACT_CODES = frozenset(
    {"OK", "ABORTED", "FAILED_PRECONDITION", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
)
#: And a malformed call: INVALID_ARGUMENT (or ABORTED, a final no, for an unknown
#: operation or a payload that does not decode).
MALFORMED_CODES = frozenset({"INVALID_ARGUMENT", "ABORTED"})


@dataclass
class Exchange:
    """One call the kit made and the answer it got."""

    method: str
    request: dict[str, Any]
    code: str = ""
    details: str = ""
    read_only: bool = False
    result: str = ""
    #: The call is malformed on purpose (INVALID_ARGUMENT is then in the contract).
    malformed: bool = False
    #: A Stream call: its id on the stream (0 for a unary call).
    stream_id: int = 0

    def answer(self) -> tuple[str, bool, str]:
        """What must be equal between a call and its duplicate: code, vote, result."""
        return (self.code, self.read_only, self.result)

    def brief(self) -> str:
        req = self.request
        what = req.get("operation") or "-"
        extra = " one_phase" if req.get("one_phase") else ""
        if req.get("epoch"):
            extra += f" epoch={req['epoch']}"
        out = f"{self.method}({what}{extra} gid={req.get('gid')!r}) -> {self.code}"
        if self.read_only:
            out += " read_only"
        if self.result:
            out += f" {self.result}"
        return out

    def short(self) -> str:
        """``Prepare->OK``, ``get=7``: a call in a few characters."""
        op = self.request.get("operation", "")
        if op == "conformance.get" and self.code == "OK":
            try:
                return f"get={json.loads(self.result)['value']}"
            except (ValueError, KeyError, TypeError):
                pass
        if self.method.startswith("Health/"):
            return f"{self.method}({self.request.get('service', '')!r})->{self.result or self.code}"
        name = self.method + ("(1PC)" if self.request.get("one_phase") else "")
        return f"{name}->{self.code}" + (" read_only" if self.read_only else "")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "request": self.request,
            "code": self.code,
            "details": self.details,
            "read_only": self.read_only,
            "result": self.result,
        }
        if self.malformed:
            d["malformed"] = True
        if self.stream_id:
            d["stream_id"] = self.stream_id
        return d


@dataclass
class RuleResult:
    name: str
    description: str
    required: bool = True
    passed: bool = False
    skipped: bool = False
    #: What went wrong (empty when it passed), one line each.
    failures: list[str] = field(default_factory=list)
    #: Every call the rule made, in order.
    evidence: list[Exchange] = field(default_factory=list)
    #: Why it was skipped, or a note.
    note: str = ""

    @property
    def status(self) -> str:
        return "skip" if self.skipped else "pass" if self.passed else "FAIL"

    def summary(self) -> str:
        """One line per failure; for a rule that passed, its calls in short."""
        if self.skipped:
            return self.note
        if not self.passed:
            return "\n".join(self.failures)
        calls = ", ".join(e.short() for e in self.evidence)
        return "\n".join(part for part in (calls, self.note) if part)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "required": self.required,
            "passed": self.passed,
            "skipped": self.skipped,
            "failures": self.failures,
            "note": self.note,
            "evidence": [e.to_dict() for e in self.evidence],
        }


@dataclass
class Report:
    participant: str
    service: str
    run: str
    rules: list[RuleResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every required rule passed (optional rules are reported apart)."""
        return all(r.passed for r in self.rules if r.required)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def failed(self) -> list[str]:
        return [r.name for r in self.rules if not r.passed and not r.skipped]

    def to_dict(self) -> dict[str, Any]:
        required = [r for r in self.rules if r.required]
        optional = [r for r in self.rules if not r.required]
        return {
            "participant": self.participant,
            "service": self.service,
            "run": self.run,
            "passed": self.ok,
            "required": {"total": len(required), "passed": sum(r.passed for r in required)},
            "optional": {
                "total": len(optional),
                "passed": sum(r.passed for r in optional),
                "skipped": sum(r.skipped for r in optional),
            },
            "rules": [r.to_dict() for r in self.rules],
        }


def render(report: Report, console: Any) -> None:
    """The report as a rich table (rule, result, evidence summary) and a verdict line."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"conformance of {report.participant} (run {report.run})")
    table.add_column("rule", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("evidence")
    colours = {"pass": "green", "FAIL": "red", "skip": "yellow"}
    for r in report.rules:
        label = r.name if r.required else f"{r.name} (optional)"
        status = f"[{colours[r.status]}]{r.status}[/]"
        table.add_row(escape(label), status, escape(r.summary()))
    console.print(table)
    required = [r for r in report.rules if r.required]
    optional = [r for r in report.rules if not r.required]
    line = f"{sum(r.passed for r in required)}/{len(required)} required rules passed"
    if optional:
        line += "; optional: " + ", ".join(f"{r.name} {r.status}" for r in optional)
    verdict = "[green]CONFORMS[/]" if report.ok else "[red]DOES NOT CONFORM[/]"
    console.print(f"{verdict}: {escape(line)}")
    if not report.ok:
        console.print("failed: " + escape(", ".join(report.failed())))
