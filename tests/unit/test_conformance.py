"""The conformance kit's bookkeeping: which answers the result-codes rule accepts, the
exit code (required rules only), the JSON shape, and the one-line evidence."""

from __future__ import annotations

import io
import json

from rich.console import Console

from accord.tools.conformance import RULES, Exchange, Report, RuleResult, check_codes, render


def ex(code: str, *, malformed: bool = False, method: str = "Prepare") -> Exchange:
    return Exchange(method, {"gid": "g", "operation": "conformance.add"}, code, malformed=malformed)


def rule(
    name: str,
    *calls: Exchange,
    required: bool = True,
    passed: bool = False,
    skipped: bool = False,
    failures: list[str] | None = None,
) -> RuleResult:
    return RuleResult(
        name,
        "",
        required=required,
        passed=passed,
        skipped=skipped,
        failures=failures or [],
        evidence=list(calls),
    )


def test_result_codes_accepts_the_contract_and_names_the_rest() -> None:
    ok = [
        rule("a", ex("OK"), ex("ABORTED"), ex("FAILED_PRECONDITION"), ex("UNAVAILABLE")),
        rule("b", ex("INVALID_ARGUMENT", malformed=True), ex("ABORTED", malformed=True)),
        rule("stream", ex("UNIMPLEMENTED", method="Stream"), required=False, skipped=True),
        rule("c", ex("")),  # no answer (the rule failed before): not judged here
    ]
    assert check_codes(ok).passed
    bad = check_codes(
        [
            rule("a", ex("INTERNAL"), ex("OK", malformed=True)),
            rule("b", ex("INVALID_ARGUMENT")),
            rule("stream", ex("UNIMPLEMENTED"), required=False),
        ]
    )
    assert not bad.passed
    assert len(bad.failures) == 4 and [e.code for e in bad.evidence] == [
        "INTERNAL",
        "OK",
        "INVALID_ARGUMENT",
        "UNIMPLEMENTED",
    ]
    assert bad.failures[0].startswith("[a] Prepare(conformance.add gid='g') -> INTERNAL")


def test_only_required_rules_decide_the_exit_code() -> None:
    report = Report("127.0.0.1:1", "", "run", [rule("a", passed=True)])
    report.rules.append(rule("stream", required=False, passed=False))
    assert report.ok and report.exit_code == 0
    report.rules.append(rule("b", passed=False, failures=["x"]))
    assert not report.ok and report.exit_code == 1
    assert report.failed() == ["stream", "b"]
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is False
    assert d["required"] == {"total": 2, "passed": 1}
    assert d["optional"] == {"total": 1, "passed": 0, "skipped": 0}
    assert {"name", "required", "passed", "skipped", "evidence", "failures"} <= set(d["rules"][0])


def test_short_evidence_and_the_table() -> None:
    get = Exchange(
        "Execute", {"operation": "conformance.get"}, "OK", result='{"key":"k","value":7}'
    )
    assert get.short() == "get=7"
    one = Exchange("Commit", {"operation": "conformance.add", "one_phase": True}, "ABORTED")
    assert one.short() == "Commit(1PC)->ABORTED"
    report = Report("127.0.0.1:1", "", "r1", [rule("fencing", one, failures=["stale epoch OK"])])
    out = io.StringIO()
    render(report, Console(file=out, width=120))
    text = out.getvalue()
    assert "DOES NOT CONFORM" in text and "stale epoch OK" in text and "failed: fencing" in text


def test_rule_names_are_unique_and_only_stream_is_optional() -> None:
    names = [r.name for r in RULES]
    assert len(names) == len(set(names)) and "result-codes" not in names
    assert [r.name for r in RULES if not r.required] == ["stream"]
