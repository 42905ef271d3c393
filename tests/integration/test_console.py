"""The web console in a real browser: etcd, a coordinator, two banks and `accord query
--http` (twice: with --console-actions and --trace-url, and without), some
transactions (commits, refusals, an Abort, sagas compensated, STUCK and running), then
tests/browser/console.spec.mjs drives Debian's chromium through playwright-core: the
transactions page and its filters, pages, a live update this test triggers while the
page is open, a saga's and a 2PC's timeline, HTML in errors shown as text, and the
operator actions. Screenshots go to the test's directory (screens/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from accord.client import AccordClient, Branch, SagaStep
from accord.tools.topology import ManagedProcess, accord_argv
from tests.integration.conftest import Cluster, free_port, open_accounts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BROWSER_DIR = ROOT / "tests" / "browser"
SPEC = BROWSER_DIR / "console.spec.mjs"
CHROMIUM = os.environ.get("ACCORD_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node") or "/usr/bin/node"
TRACE_URL = "http://jaeger:16686/trace/{trace_id}"
XSS = "<img src=x onerror=alert(1)>"
SCRIPT_REASON = "<script>alert('reason')</script> changed my mind"
KEY = "<b>key</b><script>alert(2)</script>"
BROWSER_TIMEOUT_S = 240


def start_query(cluster: Cluster, name: str, args: list[str]) -> tuple[ManagedProcess, str]:
    argv = ["query", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--id", name]
    argv += ["--db", str(cluster.root / f"{name}.db"), *args]
    proc = cluster.topology.start(cluster.topology.process(name, accord_argv(argv)))
    for line in proc.output().splitlines():
        if line.startswith("http on "):
            return proc, "http://" + line[len("http on ") :].strip()
    raise AssertionError(f"{name} printed no 'http on' line:\n{proc.output()}")


def api(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        return json.loads(resp.read())


async def caught_up(base: str, gids: list[str], timeout_s: float = 30.0) -> None:
    """Until every gid is in the read model in a state that stays."""
    deadline = time.monotonic() + timeout_s
    missing: list[str] = gids
    while time.monotonic() < deadline:
        listed = await asyncio.to_thread(api, base, "/api/transactions?page_size=1000")
        have = {t["gid"] for t in listed["transactions"]}
        missing = [g for g in gids if g not in have]
        if not missing:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{base}: not in the read model after {timeout_s}s: {missing}")


def needs_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (Debian's chromium)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/browser/node_modules is missing: run `make node-deps` (npm ci)")


async def workload(client: AccordClient, down: str, silent: ManagedProcess) -> dict[str, Any]:
    gids: dict[str, Any] = {"committed": [], "aborted": []}
    for _ in range(3):
        r = await client.execute(
            [
                Branch(service="bank-a", operation="debit", payload={"account": "x", "amount": 1}),
                Branch(service="bank-b", operation="credit", payload={"account": "y", "amount": 1}),
            ],
        )
        assert r.state == "COMMITTED", r
        gids["committed"].append(r.gid)
    # Refused: the bank's refusal names the account, HTML and all.
    r = await client.execute(
        [
            Branch(service="bank-a", operation="debit", payload={"account": XSS, "amount": 1}),
            Branch(service="bank-b", operation="credit", payload={"account": "y", "amount": 1}),
        ],
        idempotency_key=KEY,
    )
    assert r.state == "ABORTED" and XSS in r.reason, r
    gids["xss"] = r.gid
    gids["aborted"].append(r.gid)
    # An Abort whose reason is a script.
    tx = await client.begin()
    await tx.enlist(
        Branch(service="bank-a", operation="credit", payload={"account": "x", "amount": 1})
    )
    r = await tx.abort(SCRIPT_REASON)
    assert r.state == "ABORTED", r
    gids["script_abort"] = r.gid
    gids["aborted"].append(r.gid)

    def step(name: str, **kw: Any) -> SagaStep:
        return SagaStep(name=name, max_attempts=2, initial_interval_ms=20, max_interval_ms=50, **kw)

    # Compensated: the second step debits an account that does not exist.
    r = await client.start_saga(
        [
            step(
                "debit",
                service="bank-a",
                action="debit",
                compensation="refund",
                payload={"account": "x", "amount": 2},
            ),
            step(
                "refused",
                service="bank-b",
                action="debit",
                compensation="refund",
                payload={"account": "missing", "amount": 2},
                depends_on=("debit",),
                final_codes=("FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND"),
            ),
        ]
    )
    assert r.state == "COMPENSATED", r
    gids["compensated"] = r.gid
    # STUCK: the second step's participant stops answering (SIGSTOP) once the
    # coordinator is connected to it, so its action is sent and never answered (it may
    # have run) and its compensation gets no answer either. (A participant that was never
    # reachable would not do: a step none of whose attempts was sent is UNDELIVERED and
    # needs no compensation.)
    lost: dict[str, Any] = {
        "address": silent.address,
        "action": "credit",
        "compensation": "uncredit",
        "payload": {"account": "z", "amount": 1},
    }
    warm = await client.start_saga([step("warm", **lost)])
    assert warm.state == "COMPLETED", warm
    silent.pause()
    try:
        r = await client.start_saga(
            [
                step(
                    "debit",
                    service="bank-a",
                    action="debit",
                    compensation="refund",
                    payload={"account": "x", "amount": 1},
                ),
                step("lost", depends_on=("debit",), timeout_ms=300, **lost),
            ]
        )
    finally:
        silent.resume()
    assert r.state == "STUCK", r
    gids["stuck"] = r.gid
    # Running: a step retried for a long while (cancelled from the console).
    running = SagaStep(
        name="slow",
        address=down,
        action="credit",
        compensation="uncredit",
        payload={"account": "z", "amount": 1},
        max_attempts=1000,
        initial_interval_ms=500,
        max_interval_ms=500,
    )
    r = await client.start_saga([running], wait=False)
    gids["running"] = r.gid
    return gids


async def test_console_in_chromium(cluster: Cluster, tmp_path: Path) -> None:
    needs_browser()
    etcd = cluster.etcd()
    a = cluster.bank("bank-a", etcd=etcd.url)
    b = cluster.bank("bank-b", etcd=etcd.url)
    await open_accounts(a.address, {"x": 1000})
    await open_accounts(b.address, {"y": 1000})
    coord = cluster.topology.coordinator(
        "c1",
        etcd=etcd.url,
        wal="wal-s1",
        cid="c1",
        shard="s1",
        ttl_s=2,
        retry_max_s=0.2,
        log_level=None,
        extra=["--trace-console"],
    )
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    silent = cluster.bank("bank-c")  # answers, then is paused (see workload)
    await open_accounts(silent.address, {"z": 0})
    _, url = start_query(
        cluster, "query", ["--etcd", etcd.url, "--trace-url", TRACE_URL, "--console-actions"]
    )
    _, plain_url = start_query(cluster, "query-plain", ["--coordinator", f"s1={coord.address}"])

    async with await AccordClient.from_etcd(etcd.url, timeout_s=20) as client:
        gids = await workload(client, down, silent)
        every = [*gids["committed"], *gids["aborted"], gids["compensated"], gids["stuck"]]
        await caught_up(url, [*every, gids["running"]])
        await caught_up(plain_url, [gids["stuck"]])

        out = tmp_path / "screens"
        out.mkdir()
        spec = tmp_path / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "url": url,
                    "plain_url": plain_url,
                    "out": str(out),
                    "trace_url": TRACE_URL,
                    "gids": gids,
                    "xss": XSS,
                }
            )
        )
        browser = await asyncio.create_subprocess_exec(
            NODE,
            str(SPEC),
            cwd=BROWSER_DIR,
            env={**os.environ, "CONSOLE_SPEC": str(spec), "CHROMIUM": CHROMIUM},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            # The live update: once the page is open and subscribed, a new transaction.
            for _ in range(1200):  # 120 s at most
                if (out / "ready-live").exists() or browser.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            if browser.returncode is None:
                r = await client.execute(
                    [
                        Branch(
                            service="bank-a",
                            operation="credit",
                            payload={"account": "x", "amount": 1},
                        )
                    ]
                )
                assert r.state == "COMMITTED", r
                (out / "live-gid").write_text(r.gid)
            async with asyncio.timeout(BROWSER_TIMEOUT_S):
                stdout, _ = await browser.communicate()
        finally:
            if browser.returncode is None:
                browser.kill()
                await browser.wait()
    text = stdout.decode(errors="replace")
    print(text)
    assert browser.returncode == 0, f"the browser test failed:\n{text}"
    assert "all checks passed" in text
    shots = sorted(p.name for p in out.glob("*.png"))
    assert {"transactions.png", "transactions-aborted.png", "transaction-saga.png"} <= set(shots)
    for p in out.glob("*.png"):
        assert p.stat().st_size > 5000, p
