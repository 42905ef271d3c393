"""Running a chaos test end to end: start, load and break, heal, wait for quiescence,
collect, check, report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from accord.common import runner
from accord.common.transport import TransportSettings, configured
from accord.tools.chaos._harness import (
    Chaos,
    ChaosSettings,
    copy_dbs,
    percentile,
    save_json,
    settings_dict,
    tls_certs,
)
from accord.tools.chaos._query import compare as compare_read_model
from accord.tools.chaos._query import start_query
from accord.tools.topology import PostgresServer, Topology, workdir

if TYPE_CHECKING:
    from accord.participants._audit import AuditRow


def run_chaos(s: ChaosSettings, *, console: Console | None) -> dict[str, Any]:
    """Runs the test; returns the report (also saved as ``report.json`` in the run's
    directory, with the history, the databases and every process's log)."""
    # A run printed to a console keeps its directory: the report names it.
    with workdir(s.out_dir, prefix="accord-chaos-", keep=console is not None) as root:
        # With TLS, this process talks to the topology as "client" (tls_certs: its CA);
        # with --net, in plain text to the lab's (non-loopback) addresses.
        client = Topology(root, certs=tls_certs(root)).transport() if s.tls else None
        if s.net and client is None:
            client = TransportSettings(insecure=True)
        with configured(client):
            report = runner.run(_run(s, root, console))
    if console is not None:
        print_report(console, report)
    return report


async def _run(s: ChaosSettings, root: Path, console: Console | None) -> dict[str, Any]:
    progress = Progress(
        TextColumn("[bold]chaos[/bold] seed {task.fields[seed]}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn(
            "txns {task.fields[txns]}  kills {task.fields[kills]}  "
            "faults {task.fields[faults]}  violations {task.fields[violations]}"
        ),
        console=console,
        disable=console is None,
        transient=False,
    )
    task = progress.add_task(
        "run", total=s.duration_s, seed=s.seed, txns=0, kills=0, faults=0, violations="-"
    )

    def on_progress(c: Chaos) -> None:
        progress.update(
            task,
            completed=min(s.duration_s, time.monotonic() - c.started),
            txns=c.stats.ops["ok"] + c.stats.ops["fail"] + c.stats.ops["info"],
            kills=c.stats.faults["kill"],
            faults=sum(c.stats.faults.values()),
        )

    chaos = Chaos(s, root, on_progress)
    read_model: dict[str, Any] | None = None
    t_start = time.monotonic()
    try:
        await asyncio.to_thread(chaos.start_topology)
        query_proc = None
        if s.query:
            host = chaos.lab.host("query") if chaos.lab is not None else None
            query_proc = await asyncio.to_thread(
                start_query, chaos.topology, chaos.etcd_url, root, host
            )
        chaos.started = time.monotonic()
        with progress:
            ticker = asyncio.create_task(_tick(progress, task, chaos, s.duration_s))
            try:
                await chaos.run()
            finally:
                ticker.cancel()
            chaos.pending_recoveries()
            await chaos.heal()
            quiesce_s = await chaos.quiesce()
            coordinators = await chaos.coordinator_state()
            if query_proc is not None:
                read_model = await compare_read_model(query_proc.address, coordinators)
        save_json(root / "coordinators.json", coordinators)
    finally:
        await asyncio.to_thread(chaos.stop_all)
        chaos.history.close()
    if chaos.postgres is not None:
        dbs = await asyncio.to_thread(
            snapshot_postgres, chaos.postgres, chaos.db_urls, root / "final"
        )
    else:
        dbs = copy_dbs(root, chaos.banks, root / "final")
    initial = {f"{bank}-{i}": s.initial_balance for bank in chaos.banks for i in range(s.accounts)}
    save_json(root / "initial.json", initial)
    check = check_run(root, dbs, initial, coordinators, s.recovery_bound_s)
    owners = owner_overlaps(dbs)
    st = chaos.stats
    faults = _faults(root)
    report = {
        "seed": s.seed,
        "settings": settings_dict(s),
        "dir": str(root),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "transactions": st.ops["ok"] + st.ops["fail"] + st.ops["info"],
        "ok": st.ops["ok"],
        "fail": st.ops["fail"],
        "info": st.ops["info"],
        "transfers": st.ops["transfer"],
        "sagas": st.ops["saga"],
        "coordinator_kills": sum(
            1
            for f in faults
            if f["fault"] in ("kill", "power-loss") and f["target"].startswith("coord")
        ),
        "participant_kills": sum(
            1 for f in faults if f["fault"] == "kill" and f["target"].startswith("bank")
        ),
        "faults": dict(st.faults),
        "power_losses": st.faults["power-loss"],
        "in_doubt_at_kill": sum(st.in_doubt_at_kill),
        "quiescent_after_heal_s": round(quiesce_s, 2),
        "restart_to_ready_s": {
            "p50": percentile(st.restart_to_ready_s, 50),
            "p99": percentile(st.restart_to_ready_s, 99),
        },
        "kill_to_first_commit_s": {
            "p50": percentile(st.kill_to_commit_s, 50),
            "p99": percentile(st.kill_to_commit_s, 99),
        },
        "network": {
            "net": s.net,
            "etcd_members": s.etcd_members,
            # Seconds from a network fault's heal to the first transaction that
            # succeeded through the healed link, by fault kind.
            "recover_after_heal_s": {
                kind: {
                    "n": len(v),
                    "p50": percentile(v, 50),
                    "max": round(max(v), 3),
                }
                for kind, v in sorted(st.recover_s.items())
            },
            "unrecovered_at_end": dict(st.unrecovered),
            "fenced_exits": st.fenced_exits,
            "skipped": dict(st.skipped),
        },
        "owners": owners,
        "violations": [
            {"name": v["name"], "message": v["message"], "gid": v["gid"]}
            for v in check["violations"]
        ]
        + (read_model["violations"] if read_model is not None else [])
        + [{"name": "owner-overlap", "message": o, "gid": ""} for o in owners["overlap_examples"]],
        "checks": check["checks"],
        "examples": check["examples"],
        "stuck": check.get("stuck", []),
    }
    if read_model is not None:
        report["read_model"] = {k: v for k, v in read_model.items() if k != "violations"}
    save_json(root / "report.json", report)
    return report


def owner_overlaps(dbs: dict[str, Path]) -> dict[str, Any]:
    """Whether two owners of a shard ever acted at once, as the banks saw it: each
    accepted coordinator call is audited with its shard, fencing epoch and wall time (one
    clock: every process runs on this machine). An owner of epoch ``e`` acting after an
    owner of a higher epoch first acted is an overlap (a violation ``owner-overlap``).
    Calls refused as FENCED are counted: fencing at work, not an overlap. (The checker's
    invariants cannot see an overlap as such: they judge outcomes, and an overlap only
    breaks one when both owners touch the same transaction.)"""
    from accord.participants._audit import read_audit

    return overlaps_in([row for path in dbs.values() for row in read_audit(path)])


def overlaps_in(rows: Iterable[AuditRow]) -> dict[str, Any]:
    """:func:`owner_overlaps` on audit rows (of every bank)."""
    first: dict[tuple[str, int], float] = {}
    last: dict[tuple[str, int], float] = {}
    fenced = 0
    for row in rows:
        if row.source != "coordinator" or not row.shard:
            continue
        if row.outcome.value == "FENCED":
            fenced += 1
            continue
        k = (row.shard, row.epoch)
        first[k] = min(first.get(k, row.at), row.at)
        last[k] = max(last.get(k, row.at), row.at)
    examples = []
    for (shard, epoch), end in sorted(last.items()):
        for (other, later), start in sorted(first.items()):
            if other == shard and later > epoch and start < end:
                examples.append(
                    f"shard {shard}: epoch {epoch} acted until {end:.3f}, after epoch "
                    f"{later} began at {start:.3f} ({end - start:.3f} s overlap)"
                )
    epochs: dict[str, int] = {}
    for shard, _ in first:
        epochs[shard] = epochs.get(shard, 0) + 1
    return {"epochs_seen": epochs, "fenced_calls": fenced, "overlap_examples": examples[:20]}


def snapshot_postgres(server: PostgresServer, urls: dict[str, str], dest: Path) -> dict[str, Path]:
    """Each PostgreSQL bank's final state, read after every process has stopped (the
    server is started again on its data for that, then stopped and its data removed),
    saved as ``dest/NAME.db`` in the SQLite bank's layout: what the checker reads."""
    from accord.tools.chaos._pgstate import load_postgres_participant, save_participant

    server.start()
    try:
        return {
            name: save_participant(load_postgres_participant(name, url), dest / f"{name}.db")
            for name, url in urls.items()
        }
    finally:
        server.remove()


async def _tick(progress: Progress, task: Any, chaos: Chaos, duration_s: float) -> None:
    while True:
        progress.update(task, completed=min(duration_s, time.monotonic() - chaos.started))
        await asyncio.sleep(0.5)


def _faults(root: Path) -> list[dict[str, Any]]:
    import json

    out = []
    with (root / "history.jsonl").open() as f:
        for line in f:
            event = json.loads(line)
            if event.get("type") == "fault":
                out.append(event)
    return out


def check_run(
    root: Path,
    dbs: dict[str, Path],
    initial: dict[str, int],
    coordinators: list[dict[str, Any]],
    bound_s: float,
) -> dict[str, Any]:
    from accord.tools.chaos._checker import check

    report = check(
        root / "history.jsonl",
        databases=dbs,
        initial=initial,
        coordinator_state=coordinators,
        recovery_bound_s=bound_s,
    )
    data = report.to_dict()
    save_json(root / "check.json", data)
    return data


def print_report(console: Console, r: dict[str, Any]) -> None:
    table = Table(title=f"accord chaos (seed {r['seed']})", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("transactions", f"{r['transactions']} ({r['transfers']} 2PC, {r['sagas']} sagas)"),
        ("bank databases", str(r["settings"].get("participant_db", "sqlite"))),
        ("ok / fail / unknown", f"{r['ok']} / {r['fail']} / {r['info']}"),
        ("coordinator kills", str(r["coordinator_kills"])),
        ("participant kills", str(r["participant_kills"])),
        ("other faults", ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items()))),
        ("in flight at coordinator kills", str(r["in_doubt_at_kill"])),
        (
            "recovery after a healed network fault (first txn through the link)",
            ", ".join(
                f"{k} p50 {v['p50']} s max {v['max']} s (n {v['n']})"
                for k, v in r["network"]["recover_after_heal_s"].items()
            )
            or "-",
        ),
        (
            "owner epochs seen / calls refused as fenced / overlaps",
            f"{sum(r['owners']['epochs_seen'].values())} / {r['owners']['fenced_calls']} / "
            f"{len(r['owners']['overlap_examples'])}",
        ),
        ("quiescent after healing", f"{r['quiescent_after_heal_s']} s"),
        (
            "restart to ready p50 / p99",
            f"{r['restart_to_ready_s']['p50']} s / {r['restart_to_ready_s']['p99']} s",
        ),
        (
            "kill to first commit (new owner) p50 / p99",
            f"{r['kill_to_first_commit_s']['p50']} s / {r['kill_to_first_commit_s']['p99']} s",
        ),
        ("invariants checked", str(len(r["checks"]))),
        ("sagas left STUCK (reported)", str(len(r["stuck"]))),
        ("violations", str(len(r["violations"]))),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if r["violations"]:
        for name, count in r["checks"].items():
            if count:
                example = r["examples"][name]
                console.print(
                    f"[red]{name}[/red]: {count} violation(s); smallest: {example['message']}"
                )
    else:
        console.print("[bold green]no violations[/bold green]")
    console.print(f"history, databases, logs and report.json in {r['dir']}")
