"""The ``accord`` command line: one entry point whose subcommands delegate to the
packages. Every option can also be set through an ``ACCORD_*`` environment variable."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from accord.common import runner
from accord.common.exits import ExitCode
from accord.common.logs import LogFormat, LogLevel
from accord.tools._choices import FAULT_HELP, Fault, LoadMode, ParticipantDb, TxnStateChoice

app = typer.Typer(
    name="accord",
    help="Accord: a distributed transaction coordinator (2PC and sagas) over gRPC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
participant_app = typer.Typer(help="Run a participant service.", no_args_is_help=True)
txn_app = typer.Typer(help="Run and inspect transactions on a coordinator.", no_args_is_help=True)
app.add_typer(participant_app, name="participant")
app.add_typer(txn_app, name="txn")

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("accord.cli")


def setup_logging(level: LogLevel, fmt: LogFormat) -> None:
    from accord.common.logs import configure

    configure(level=level, fmt=fmt)


# The coordinator's participant transports (accord.coordinator.Transport) are not
# imported here: every command would pay for importing the coordinator
# (tests/unit/test_cli_choices.py keeps the two equal). The tools' own choices come from
# accord.tools._choices.


class ParticipantTransport(StrEnum):
    AUTO = "auto"
    STREAM = "stream"
    UNARY = "unary"


class Faults(tuple[Fault, ...]):
    """The value of ``--faults``: comma-separated :class:`Fault` names."""

    @classmethod
    def parse(cls, value: str | Iterable[Fault]) -> Faults:
        if not isinstance(value, str):
            return cls(value)
        try:
            chosen = cls(Fault(f.strip()) for f in value.split(",") if f.strip())
        except ValueError as e:
            raise typer.BadParameter(f"{e}; choose from {', '.join(Fault)}") from None
        if not chosen:
            raise typer.BadParameter(f"choose from {', '.join(Fault)}")
        return chosen

    def __str__(self) -> str:
        return ",".join(self)


DEFAULT_FAULTS = Faults((Fault.KILL_COORDINATOR, Fault.KILL_PARTICIPANT))


def fail(message: str, code: ExitCode = ExitCode.FAILURE) -> typer.Exit:
    """``error: MESSAGE`` on stderr, one line; the exit to raise."""
    from rich.markup import escape  # a message may quote user input: never markup

    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


LogLevelOpt = Annotated[
    LogLevel, typer.Option(envvar="ACCORD_LOG_LEVEL", case_sensitive=False, help="log level")
]
# No environment variable: an output format chosen per invocation (an exported one would
# change what every script reading another command's output gets).
JsonOut = Annotated[bool, typer.Option("--json", help="print JSON")]
RegistryEtcd = Annotated[
    str,
    typer.Option(
        "--etcd",
        envvar="ACCORD_ETCD",
        help="etcd URL (http://host:port[,...]): register there, find the others there",
    ),
]
LeaseTtl = Annotated[
    int, typer.Option("--ttl", envvar="ACCORD_TTL_S", help="lease TTL of the registration (s)")
]
EtcdWait = Annotated[
    float,
    typer.Option(
        "--etcd-wait-s",
        envvar="ACCORD_ETCD_WAIT_S",
        min=0,
        help="at start-up, give up (exit 1) if etcd has not answered within this many seconds",
    ),
]
LogFormatOpt = Annotated[
    LogFormat, typer.Option(envvar="ACCORD_LOG_FORMAT", case_sensitive=False, help="log format")
]
MetricsListen = Annotated[
    str,
    typer.Option(
        envvar="ACCORD_METRICS_LISTEN",
        help="serve Prometheus metrics on HOST:PORT (/metrics); off when empty",
    ),
]
TraceConsole = Annotated[
    bool,
    typer.Option(
        "--trace-console",
        envvar="ACCORD_TRACE_CONSOLE",
        help="print spans to stdout (OTLP: set OTEL_EXPORTER_OTLP_ENDPOINT)",
    ),
]


# ---------------------------------------------------------------- transport security
# One set of options, the same on every command that serves or calls: the decorator
# :func:`secured` adds them to a command's signature and turns them into the process's
# TransportSettings (and etcd's TLS) in one place, :func:`use_tls`, before the command
# runs. Each option has its ACCORD_* variable (the ones common/transport.py and
# registry/_etcd.py read), so the environment route works too, also for processes this
# one starts (`accord load --processes N`).

_TLS_OPTIONS: dict[str, Any] = {
    "tls_cert": (
        Annotated[
            Path | None,
            typer.Option(
                "--tls-cert",
                envvar="ACCORD_TLS_CERT",
                help="this process's certificate (PEM): TLS on every link",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
    "tls_key": (
        Annotated[
            Path | None,
            typer.Option(
                "--tls-key",
                envvar="ACCORD_TLS_KEY",
                help="its private key (PEM)",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
    "tls_ca": (
        Annotated[
            Path | None,
            typer.Option(
                "--tls-ca",
                envvar="ACCORD_TLS_CA",
                help="the CA (PEM) the peers' certificates must chain to: mutual TLS",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
    "insecure": (
        Annotated[
            bool,
            typer.Option(
                "--insecure",
                envvar="ACCORD_INSECURE",
                help="allow plain text on and to non-loopback addresses (refused otherwise)",
                rich_help_panel="Transport security",
            ),
        ],
        False,
    ),
    "etcd_ca": (
        Annotated[
            Path | None,
            typer.Option(
                "--etcd-ca",
                envvar="ACCORD_ETCD_CA",
                help="https:// etcd: the CA of etcd's certificate (default: --tls-ca)",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
    "etcd_cert": (
        Annotated[
            Path | None,
            typer.Option(
                "--etcd-cert",
                envvar="ACCORD_ETCD_CERT",
                help="https:// etcd: client certificate (default: --tls-cert)",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
    "etcd_key": (
        Annotated[
            Path | None,
            typer.Option(
                "--etcd-key",
                envvar="ACCORD_ETCD_KEY",
                help="https:// etcd: its key (default: --tls-key)",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
}
_ALLOW_OPTION: dict[str, Any] = {
    "allow_coordinator": (
        Annotated[
            list[str] | None,
            typer.Option(
                "--allow-coordinator",
                envvar="ACCORD_ALLOW_COORDINATORS",
                metavar="NAME",
                help="accept branch calls only from coordinators whose certificate names "
                "NAME (SAN DNS or URI accord:NAME; repeatable, or comma-separated in the "
                "variable); none: any certificate of the CA",
                rich_help_panel="Transport security",
            ),
        ],
        None,
    ),
}


@contextlib.contextmanager
def use_tls(
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
    insecure: bool = False,
    etcd_ca: Path | None = None,
    etcd_cert: Path | None = None,
    etcd_key: Path | None = None,
    allow_coordinator: Sequence[str] | None = None,
) -> Iterator[Any]:
    """The options → this process's TransportSettings (and etcd's TLS), its default and
    exported to the processes it starts for as long as the command runs (then the
    previous ones: a command run in-process leaves nothing behind); one line and exit 2
    when they do not make sense or a file cannot be read."""
    import os

    from accord.common.exits import StartupError
    from accord.common.transport import TransportSettings, configured, split_names
    from accord.registry import EtcdTls
    from accord.registry._etcd import configured_etcd_tls

    settings = TransportSettings(
        cert=tls_cert,
        key=tls_key,
        ca=tls_ca,
        insecure=insecure,
        allow_coordinators=split_names(allow_coordinator or ()),
    )
    try:
        settings.check()
    except StartupError as e:
        raise fail(str(e), ExitCode.USAGE) from None
    env = settings.env()
    for name, f in (
        ("ACCORD_ETCD_CA", etcd_ca),
        ("ACCORD_ETCD_CERT", etcd_cert),
        ("ACCORD_ETCD_KEY", etcd_key),
    ):
        if f is not None:
            env[name] = str(f)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with (
            configured(settings),
            configured_etcd_tls(EtcdTls(ca=etcd_ca, cert=etcd_cert, key=etcd_key)),
        ):
            yield settings
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def secured(*, allow: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Adds the transport security options (``allow``: and ``--allow-coordinator``, for
    participants) to a command; they are applied (:func:`use_tls`) before it runs."""
    import functools
    import inspect
    import typing

    extra = {**_TLS_OPTIONS, **(_ALLOW_OPTION if allow else {})}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            with use_tls(**{name: kwargs.pop(name) for name in extra}):
                return fn(*args, **kwargs)

        params = [
            *sig.parameters.values(),
            *(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
                for name, (a, d) in extra.items()
            ),
        ]
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {
            **typing.get_type_hints(fn, include_extras=True),
            **{name: a for name, (a, _) in extra.items()},
        }
        return command

    return wrap


def setup_telemetry(service_name: str, trace_console: bool, metrics_listen: str) -> Any:
    """Traces (OTEL_* / --trace-console) and metrics (--metrics-listen) for a server
    process; the caller shuts it down on exit (flushing pending spans)."""
    from accord.common.telemetry import Telemetry

    try:
        return Telemetry.setup(
            service_name, trace_console=trace_console, metrics_listen=metrics_listen
        )
    except (ValueError, OSError) as e:
        raise fail(f"telemetry: {e}") from None


# ---------------------------------------------------------------- coordinator


AuthTokens = Annotated[
    Path | None,
    typer.Option(
        "--auth-tokens",
        envvar="ACCORD_AUTH_TOKENS",
        help="turn auth on: static bearer tokens from this file (JSON, or lines 'TOKEN "
        "ROLE[,ROLE] CALLER-ID'; roles client, reader, admin); re-read when it changes",
        show_default=False,
    ),
]
AuthJwtKey = Annotated[
    Path | None,
    typer.Option(
        "--auth-jwt-key",
        envvar="ACCORD_AUTH_JWT_KEY",
        help="turn auth on: accept JWTs signed with this key (a PEM public key, or a file "
        "holding an HMAC secret); sub is the caller, roles/role its roles",
        show_default=False,
    ),
]
AuthJwtIssuer = Annotated[
    str, typer.Option(envvar="ACCORD_AUTH_JWT_ISSUER", help="the JWTs' required iss")
]
AuthJwtAudience = Annotated[
    str, typer.Option(envvar="ACCORD_AUTH_JWT_AUDIENCE", help="the JWTs' required aud")
]
Token = Annotated[
    str,
    typer.Option(
        "--token",
        envvar="ACCORD_TOKEN",
        help="bearer token for coordinators with auth on (sent only over TLS or to loopback)",
        show_default=False,
    ),
]


def _auth_settings(tokens: Path | None, jwt_key: Path | None, issuer: str, audience: str) -> Any:
    from accord.common.auth import AuthSettings

    return AuthSettings(
        tokens_file=tokens, jwt_key=jwt_key, jwt_issuer=issuer, jwt_audience=audience
    )


@app.command()
@secured()
def coordinator(
    listen: Annotated[
        str, typer.Option(envvar="ACCORD_LISTEN", help="host:port (port 0 picks one)")
    ] = "127.0.0.1:7070",
    wal_dir: Annotated[Path, typer.Option(envvar="ACCORD_WAL_DIR", help="WAL directory")] = Path(
        "accord-wal"
    ),
    coordinator_id: Annotated[
        str, typer.Option("--id", envvar="ACCORD_ID", help="coordinator id")
    ] = "accord-1",
    shard: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_SHARD",
            help="the WAL shard it owns (default: its id); with --etcd, a second "
            "coordinator of the same shard and WAL directory waits as its standby",
        ),
    ] = "",
    service: Annotated[
        list[str] | None,
        typer.Option(
            envvar="ACCORD_SERVICES",
            help="static service map: NAME=HOST:PORT[,HOST:PORT] or @file.json (repeatable)",
        ),
    ] = None,
    default_timeout_ms: Annotated[int, typer.Option(envvar="ACCORD_DEFAULT_TIMEOUT_MS")] = 30_000,
    max_inflight: Annotated[int, typer.Option(envvar="ACCORD_MAX_INFLIGHT")] = 10_000,
    max_inflight_per_caller: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_MAX_INFLIGHT_PER_CALLER",
            help="unfinished transactions one caller may have (auth on; 0: no limit)",
        ),
    ] = 1000,
    max_watchers_per_caller: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_MAX_WATCHERS_PER_CALLER",
            help="watch and subscribe streams one caller may hold open (auth on; 0: no limit)",
        ),
    ] = 64,
    max_session_calls: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_MAX_SESSION_CALLS",
            min=1,
            help="calls in flight on one Session stream (RESOURCE_EXHAUSTED beyond)",
        ),
    ] = 1024,
    auth_tokens: AuthTokens = None,
    auth_jwt_key: AuthJwtKey = None,
    auth_jwt_issuer: AuthJwtIssuer = "",
    auth_jwt_audience: AuthJwtAudience = "",
    max_branches: Annotated[int, typer.Option(envvar="ACCORD_MAX_BRANCHES")] = 64,
    max_steps: Annotated[
        int, typer.Option(envvar="ACCORD_MAX_STEPS", help="steps per saga definition")
    ] = 64,
    max_watchers: Annotated[
        int,
        typer.Option(envvar="ACCORD_MAX_WATCHERS", help="WatchTransaction streams at once"),
    ] = 1000,
    max_subscribers: Annotated[
        int, typer.Option(envvar="ACCORD_MAX_SUBSCRIBERS", help="Subscribe streams at once")
    ] = 64,
    max_payload_bytes: Annotated[int, typer.Option(envvar="ACCORD_MAX_PAYLOAD_BYTES")] = 256 * 1024,
    call_timeout_s: Annotated[float, typer.Option(envvar="ACCORD_CALL_TIMEOUT_S")] = 5.0,
    participant_transport: Annotated[
        ParticipantTransport,
        typer.Option(
            envvar="ACCORD_PARTICIPANT_TRANSPORT",
            help="auto (a stream per participant where supported, else unary), stream, "
            "or unary (one RPC per call)",
        ),
    ] = ParticipantTransport.AUTO,
    retry_initial_s: Annotated[float, typer.Option(envvar="ACCORD_RETRY_INITIAL_S")] = 0.02,
    retry_max_s: Annotated[float, typer.Option(envvar="ACCORD_RETRY_MAX_S")] = 2.0,
    checkpoint_every: Annotated[int, typer.Option(envvar="ACCORD_CHECKPOINT_EVERY")] = 100_000,
    segment_bytes: Annotated[int, typer.Option(envvar="ACCORD_SEGMENT_BYTES")] = 64 * 1024 * 1024,
    etcd: RegistryEtcd = "",
    etcd_wait_s: EtcdWait = 30.0,
    ttl: LeaseTtl = 5,
    advertise: Annotated[
        str,
        typer.Option(envvar="ACCORD_ADVERTISE", help="address to publish (default: as bound)"),
    ] = "",
    wal_sync_marker: Annotated[
        bool,
        typer.Option(
            envvar="ACCORD_WAL_SYNC_MARKER",
            hidden=True,
            help="keep the WAL's SYNCED marker, so chaos tests can simulate a power loss",
        ),
    ] = False,
    unsafe_ignore_no_votes: Annotated[
        bool,
        typer.Option(
            envvar="ACCORD_UNSAFE_IGNORE_NO_VOTES",
            hidden=True,
            help="a deliberately broken build for the chaos checker's own test",
        ),
    ] = False,
    log_level: LogLevelOpt = LogLevel.INFO,
    log_format: LogFormatOpt = LogFormat.TEXT,
    metrics_listen: MetricsListen = "",
    trace_console: TraceConsole = False,
) -> None:
    """Run a coordinator: replay its WAL, finish what was unfinished, serve. SIGTERM or
    SIGINT stops it (exit 0) in any state, a standby's wait for its shard included."""
    from accord.common.exits import StartupError
    from accord.common.gid import check_shard_name
    from accord.coordinator import (
        CoordinatorConfig,
        Limits,
        RetryPolicy,
        ServerSettings,
        Transport,
        serve,
    )
    from accord.registry import EtcdRegistry, Registry, StaticRegistry

    setup_logging(log_level, log_format)
    registry: Registry
    try:
        if etcd and service:
            raise ValueError("give either --etcd or --service, not both")
        check_shard_name(shard or coordinator_id)
        registry = EtcdRegistry.from_url(etcd) if etcd else StaticRegistry.parse(service or [])
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    config = CoordinatorConfig(
        coordinator_id=coordinator_id,
        shard=shard or coordinator_id,
        default_timeout_ms=default_timeout_ms,
        call_timeout_s=call_timeout_s,
        retry=RetryPolicy(initial_s=retry_initial_s, max_s=retry_max_s),
        limits=Limits(
            max_inflight=max_inflight,
            max_inflight_per_caller=max_inflight_per_caller,
            max_watchers_per_caller=max_watchers_per_caller,
            max_branches=max_branches,
            max_steps=max_steps,
            max_payload_bytes=max_payload_bytes,
            max_watchers=max_watchers,
            max_subscribers=max_subscribers,
            max_session_calls=max_session_calls,
        ),
        checkpoint_every=checkpoint_every,
        segment_size=segment_bytes,
        advertise_address=advertise,
        unsafe_ignore_no_votes=unsafe_ignore_no_votes,
    )
    settings = ServerSettings(
        listen=listen,
        wal_dir=wal_dir,
        config=config,
        registration_ttl_s=ttl,
        etcd_wait_s=etcd_wait_s,
        wal_sync_marker=wal_sync_marker,
        participant_transport=Transport(participant_transport.value),
        auth=_auth_settings(auth_tokens, auth_jwt_key, auth_jwt_issuer, auth_jwt_audience),
    )
    telemetry = setup_telemetry("accord-coordinator", trace_console, metrics_listen)
    try:
        runner.run(serve(settings, registry=registry, telemetry=telemetry))
    except StartupError as e:  # expected (port in use, etcd unreachable...): one line
        raise fail(str(e), e.code) from None
    except Exception as e:  # one line, non-zero: the log has the details
        log.exception("event=coordinator_failed")
        raise fail(f"coordinator: {e}") from None
    finally:
        telemetry.shutdown()


# ---------------------------------------------------------------- participants

InstanceId = Annotated[
    str,
    typer.Option(
        envvar="ACCORD_INSTANCE_ID", help="instance id in the registry (default: service-host-port)"
    ),
]
Advertise = Annotated[
    str, typer.Option(envvar="ACCORD_ADVERTISE", help="address to publish (default: as bound)")
]


def _announce(etcd: str, instance_id: str, ttl: int, advertise: str, etcd_wait_s: float) -> Any:
    from accord.participants import Announce

    if not etcd:
        return None
    return Announce(
        etcd=etcd,
        instance_id=instance_id,
        ttl_s=ttl,
        advertise=advertise,
        etcd_wait_s=etcd_wait_s,
    )


@participant_app.command("bank")
@secured(allow=True)
def participant_bank(
    listen: Annotated[
        str, typer.Option(envvar="ACCORD_LISTEN", help="host:port (port 0 picks one)")
    ] = "127.0.0.1:7101",
    db: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_DB",
            help="SQLite file (created if missing), or a postgresql:// URL (tables created)",
        ),
    ] = "bank.db",
    service: Annotated[str, typer.Option(envvar="ACCORD_SERVICE", help="service name")] = "bank",
    accounts: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_ACCOUNTS", help="accounts <service>-0..N-1 to create if missing"
        ),
    ] = 0,
    initial_balance: Annotated[
        int, typer.Option(envvar="ACCORD_INITIAL_BALANCE", help="balance of a created account")
    ] = 0,
    in_doubt_after_s: Annotated[
        float,
        typer.Option(
            "--in-doubt-after-s",
            "--in-doubt-after",
            envvar="ACCORD_IN_DOUBT_AFTER_S",
            help="ask the coordinator about a branch prepared this long",
        ),
    ] = 10.0,
    grace: Annotated[
        float,
        typer.Option(
            envvar="ACCORD_GRACE_S", help="on SIGTERM/SIGINT, seconds for calls in progress"
        ),
    ] = 5.0,
    lock_timeout_s: Annotated[
        float,
        typer.Option(
            "--lock-timeout-s",
            envvar="ACCORD_LOCK_TIMEOUT_S",
            help="PostgreSQL: a branch waiting longer for a lock gives up (a no vote)",
        ),
    ] = 2.0,
    etcd: RegistryEtcd = "",
    etcd_wait_s: EtcdWait = 30.0,
    instance_id: InstanceId = "",
    ttl: LeaseTtl = 5,
    advertise: Advertise = "",
    log_level: LogLevelOpt = LogLevel.INFO,
    log_format: LogFormatOpt = LogFormat.TEXT,
    metrics_listen: MetricsListen = "",
    trace_console: TraceConsole = False,
) -> None:
    """Run the bank participant (accounts in SQLite or PostgreSQL; debit, credit,
    balance)."""
    from accord.common.exits import StartupError
    from accord.participants import BackendStartError
    from accord.participants.bank import serve_bank

    setup_logging(log_level, log_format)
    telemetry = setup_telemetry(f"accord-participant-{service}", trace_console, metrics_listen)
    try:
        runner.run(
            serve_bank(
                listen,
                db,
                service=service,
                accounts=accounts,
                initial_balance=initial_balance,
                in_doubt_after_s=in_doubt_after_s,
                grace_s=grace,
                lock_timeout_s=lock_timeout_s,
                announce=_announce(etcd, instance_id, ttl, advertise, etcd_wait_s),
                telemetry=telemetry,
            )
        )
    except BackendStartError as e:  # a set-up mistake: its one line says what to fix
        raise fail(f"participant: {e}") from None
    except StartupError as e:  # expected (port in use, etcd unreachable...): one line
        raise fail(str(e), e.code) from None
    except Exception as e:
        log.exception("event=participant_failed service=%s", service)
        raise fail(f"participant: {e}") from None
    finally:
        telemetry.shutdown()


@participant_app.command("pending")
def participant_pending(
    db: Annotated[
        str,
        typer.Option(envvar="ACCORD_DB", help="the participant's SQLite file or postgresql:// URL"),
    ],
    as_json: JsonOut = False,
) -> None:
    """List the branches a participant holds prepared: gid, branch, age, and the
    coordinator its in-doubt resolver will ask about each."""
    from accord.participants import BackendStartError, pending_branches

    try:
        branches = runner.run(pending_branches(db))
    except (BackendStartError, FileNotFoundError) as e:
        raise fail(f"pending: {e}") from None
    if as_json:
        print(json.dumps({"db": db, "pending": [b.to_dict() for b in branches]}))
        return
    if not branches:
        console.print("no prepared branches")
        return
    # Plain columns, one branch a line, never wrapped: for grep and for a terminal alike.
    rows = [("GID", "BRANCH", "AGE_S", "COORDINATOR", "SHARD", "TRANSACTION")]
    rows += [
        (
            b.gid,
            b.branch_id,
            f"{b.age_s:.1f}",
            b.coordinator_address or "-",
            b.shard or "-",
            b.transaction or "-",
        )
        for b in branches
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def bank_main() -> None:
    """``python -m accord.participants.bank``: the same command as ``accord participant
    bank``."""
    sys.exit(run_standalone(participant_bank, "python -m accord.participants.bank"))


def _trip_command(kind: str) -> None:
    def command(
        listen: Annotated[str, typer.Option(envvar="ACCORD_LISTEN")] = "127.0.0.1:0",
        db: Annotated[Path, typer.Option(envvar="ACCORD_DB", help="SQLite file")] = Path(
            f"{kind}.db"
        ),
        fail_city: Annotated[
            list[str] | None,
            typer.Option(
                envvar="ACCORD_FAIL_CITY", help="refuse bookings in this city (repeatable)"
            ),
        ] = None,
        in_doubt_after_s: Annotated[float, typer.Option(envvar="ACCORD_IN_DOUBT_AFTER_S")] = 10.0,
        etcd: RegistryEtcd = "",
        etcd_wait_s: EtcdWait = 30.0,
        instance_id: InstanceId = "",
        ttl: LeaseTtl = 5,
        advertise: Advertise = "",
        log_level: LogLevelOpt = LogLevel.INFO,
        log_format: LogFormatOpt = LogFormat.TEXT,
        metrics_listen: MetricsListen = "",
        trace_console: TraceConsole = False,
    ) -> None:
        from accord.common.exits import StartupError
        from accord.participants import BackendStartError
        from accord.participants.trip import serve_trip

        setup_logging(log_level, log_format)
        telemetry = setup_telemetry(f"accord-participant-{kind}", trace_console, metrics_listen)
        try:
            runner.run(
                serve_trip(
                    kind,
                    listen,
                    db,
                    fail_cities=fail_city or (),
                    in_doubt_after_s=in_doubt_after_s,
                    announce=_announce(etcd, instance_id, ttl, advertise, etcd_wait_s),
                    telemetry=telemetry,
                )
            )
        except BackendStartError as e:
            raise fail(f"participant: {e}") from None
        except StartupError as e:  # expected (port in use, etcd unreachable...): one line
            raise fail(str(e), e.code) from None
        except Exception as e:
            log.exception("event=participant_failed service=%s", kind)
            raise fail(f"participant: {e}") from None
        finally:
            telemetry.shutdown()

    command.__doc__ = f"Run the trip example's {kind} booking service (saga steps book/cancel)."
    participant_app.command(kind)(secured(allow=True)(command))


for _kind in ("flight", "hotel", "car"):
    _trip_command(_kind)


# ---------------------------------------------------------------- sidecar


@app.command()
@secured()
def sidecar(
    service: Annotated[str, typer.Option(envvar="ACCORD_SERVICE", help="service name to register")],
    target: Annotated[
        str, typer.Option(envvar="ACCORD_TARGET", help="host:port of the participant to watch")
    ],
    etcd: Annotated[str, typer.Option(envvar="ACCORD_ETCD", help="etcd URL (http://host:port)")],
    instance_id: InstanceId = "",
    advertise: Annotated[
        str,
        typer.Option(envvar="ACCORD_ADVERTISE", help="address to publish (default: --target)"),
    ] = "",
    health_service: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_HEALTH_SERVICE", help='health-checked service name ("" = server)'
        ),
    ] = "",
    operation: Annotated[
        list[str] | None,
        typer.Option(envvar="ACCORD_OPERATIONS", help="operation to advertise (repeatable)"),
    ] = None,
    ttl: LeaseTtl = 5,
    etcd_wait_s: EtcdWait = 30.0,
    interval_s: Annotated[
        float, typer.Option(envvar="ACCORD_INTERVAL_S", help="health check period (s)")
    ] = 1.0,
    log_level: LogLevelOpt = LogLevel.INFO,
    log_format: LogFormatOpt = LogFormat.TEXT,
) -> None:
    """Keep a participant that does not embed the SDK registered in etcd while its gRPC
    health status is SERVING (the sidecar pattern)."""
    from accord.common.exits import StartupError
    from accord.common.runner import stop_on_signals
    from accord.registry import Sidecar, SidecarSettings

    setup_logging(log_level, log_format)
    try:
        settings = SidecarSettings(
            service=service,
            target=target,
            etcd=etcd,
            instance_id=instance_id,
            advertise=advertise,
            health_service=health_service,
            operations=tuple(operation or ()),
            ttl_s=ttl,
            interval_s=interval_s,
            etcd_wait_s=etcd_wait_s,
        )
        car = Sidecar(settings)
    except StartupError as e:  # a malformed --target
        raise fail(str(e), e.code) from None
    except ValueError as e:
        raise fail(str(e)) from None

    async def go() -> None:
        async with stop_on_signals():  # a signal cancels the run: it deregisters
            print(f"sidecar watching {target} for service {service}", flush=True)
            await car.run(asyncio.Event())

    try:
        runner.run(go())
    except StartupError as e:  # expected (etcd unreachable, ...): one line
        raise fail(str(e), e.code) from None
    except Exception as e:
        log.exception("event=sidecar_failed service=%s", service)
        raise fail(f"sidecar: {e}") from None


@app.command()
@secured()
def health(
    address: Annotated[
        str,
        typer.Argument(
            envvar="ACCORD_HEALTH_ADDRESS",
            help="HOST:PORT of the gRPC server to ask",
            show_default=False,
        ),
    ],
    service: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_HEALTH_SERVICE",
            help='the health-checked service name ("" = the whole server)',
        ),
    ] = "",
    server_name: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_HEALTH_SERVER_NAME",
            help="with TLS: the name the server's certificate must carry (default: the "
            "host dialled)",
        ),
    ] = "",
    timeout_s: Annotated[
        float,
        typer.Option(envvar="ACCORD_HEALTH_TIMEOUT_S", min=0.1, help="give up after (s)"),
    ] = 3.0,
) -> None:
    """Ask a server's standard gRPC health service (grpc.health.v1.Health/Check): exit 0
    and print SERVING when it serves, else exit 1 with one line saying why (a container
    HEALTHCHECK or a Kubernetes exec probe)."""
    from grpc import StatusCode, aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from accord.common.exits import StartupError
    from accord.common.transport import make_channel, parse_address

    async def check() -> str:
        channel = make_channel(address, server_name=server_name)
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                resp = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
                )
            except aio.AioRpcError as e:
                if e.code() == StatusCode.NOT_FOUND:
                    return f"NOT_FOUND: no health status for service {service!r}"
                return f"{e.code().name}: {e.details()}"
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    try:
        parse_address(address)
        status = runner.run(check())
    except StartupError as e:  # a malformed address, plain text refused, a TLS file
        raise fail(str(e), e.code) from None
    print(f"{address}: {status}", flush=True)
    if status != "SERVING":
        raise typer.Exit(ExitCode.FAILURE)


# ---------------------------------------------------------------- txn

QueryAddr = Annotated[
    str,
    typer.Option(
        "--query",
        envvar="ACCORD_QUERY",
        help="read from the query service at HOST:PORT (accord query) instead of the "
        "coordinator: every shard at once, slightly behind",
    ),
]

Coordinator = Annotated[
    str, typer.Option("--coordinator", "-c", envvar="ACCORD_COORDINATOR", help="host:port")
]
EtcdUrl = Annotated[
    str,
    typer.Option(
        "--etcd",
        envvar="ACCORD_ETCD",
        help="use the coordinators registered in etcd (http://host:port) instead of "
        "--coordinator: every shard's owner, new transactions spread over the shards, "
        "each gid sent to its own shard",
    ),
]
# No environment variable: a key names one transaction for good, so an exported key
# would turn every later command into a replay of the first one.
IdempotencyKey = Annotated[
    str,
    typer.Option(
        help="names this transaction for good: a retry with the same key gets the same "
        "transaction (also an aborted one; a new attempt needs a new key)"
    ),
]
TimeoutMs = Annotated[
    int,
    typer.Option(
        envvar="ACCORD_TXN_TIMEOUT_MS",
        help="the transaction's deadline in ms (0: the coordinator's default)",
    ),
]
# No environment variable: a reason belongs to one request.
Reason = Annotated[str, typer.Option(help="why (kept with the transaction)")]


def _client_call(address: str, etcd: str, fn: Any, token: str = "") -> Any:
    from accord.client import AccordClient, AccordClientError
    from accord.common.telemetry import Telemetry

    # Spans only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the coordinator continues them).
    telemetry = Telemetry.setup("accord-client")

    async def go() -> Any:
        tracer = telemetry.tracer_provider()
        client = (
            await AccordClient.from_etcd(etcd, tracer_provider=tracer, token=token)
            if etcd
            else AccordClient(address, tracer_provider=tracer, token=token)
        )
        async with client:
            return await fn(client)

    try:
        return runner.run(go())
    except AccordClientError as e:
        raise fail(str(e)) from None
    except ValueError as e:
        raise fail(str(e)) from None
    finally:
        telemetry.shutdown()


def _print_txn(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    # Every column folds rather than cuts: an id is shown in full at any width.
    console.print(
        f"{'saga' if result.steps else 'transaction'} {result.gid}  state: "
        f"[bold]{result.state}[/bold]" + (f"  reason: {result.reason}" if result.reason else ""),
        soft_wrap=True,
    )
    if result.steps:
        steps = Table(show_header=True)
        for col in ("step", "target", "action", "state", "attempts", "last error"):
            steps.add_column(col, overflow="fold")
        for st in result.steps:
            steps.add_row(
                st.name,
                st.address,
                st.action,
                st.state,
                f"{st.attempts}+{st.compensation_attempts}",
                st.last_error,
            )
        console.print(steps)
        return
    if not result.branches:
        return
    table = Table(show_header=True)
    for col in ("branch", "target", "operation", "state"):
        table.add_column(col, overflow="fold")
    table.add_column("attempts", justify="right")
    for b in result.branches:
        table.add_row(b.branch_id, b.address, b.operation, b.state, str(b.attempts))
    console.print(table)


#: The states after which an idempotency key names a transaction that did not do its work.
_FAILED_STATES = frozenset({"ABORTING", "ABORTED", "COMPENSATING", "COMPENSATED", "STUCK"})


def _note_spent_key(result: Any, key: str) -> None:
    """An idempotency key names its first transaction for good, an aborted one too (as
    Stripe's keys do): say so when that transaction failed, since retrying with the same
    key only returns this outcome again."""
    key = key or result.idempotency_key
    if key and result.state in _FAILED_STATES:
        print(
            f"note: idempotency key {key} now names this aborted transaction; "
            "a new attempt needs a new key",
            file=sys.stderr,
        )


def _branch(spec: str) -> Any:
    """TARGET/OPERATION[:PAYLOAD]; TARGET is a service name, or HOST:PORT."""
    from accord.client import Branch

    target, sep, rest = spec.partition("/")
    op, _, payload = rest.partition(":")
    if not sep or not target or not op:
        raise fail(
            f"branch {spec!r}: expected SERVICE/OPERATION[:PAYLOAD] or "
            "HOST:PORT/OPERATION[:PAYLOAD]",
            code=ExitCode.USAGE,
        )
    if ":" in target:
        return Branch(address=target, operation=op, payload=payload.encode())
    return Branch(service=target, operation=op, payload=payload.encode())


@txn_app.command("begin")
@secured()
def txn_begin(
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    timeout_ms: TimeoutMs = 0,
    idempotency_key: IdempotencyKey = "",
    as_json: JsonOut = False,
) -> None:
    """Begin an interactive 2PC transaction; prints its gid (one line, nothing else)."""
    tx = _client_call(
        coordinator,
        etcd,
        lambda c: c.begin(timeout_ms=timeout_ms, idempotency_key=idempotency_key),
        token=token,
    )
    print(json.dumps({"gid": tx.gid}) if as_json else tx.gid)


@txn_app.command("enlist")
@secured()
def txn_enlist(
    gid: str,
    branch: Annotated[
        str, typer.Argument(help="SERVICE/OPERATION[:PAYLOAD] or HOST:PORT/OPERATION[:PAYLOAD]")
    ],
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    # No environment variable: a branch id belongs to one branch of one transaction.
    branch_id: Annotated[str, typer.Option(help="the branch's id (default: b1, b2, ...)")] = "",
    as_json: JsonOut = False,
) -> None:
    """Enlist a branch in an ACTIVE transaction; prints the branch id."""
    from dataclasses import replace

    b = replace(_branch(branch), branch_id=branch_id)
    bid = _client_call(coordinator, etcd, lambda c: c.enlist(gid, b), token=token)
    print(json.dumps({"gid": gid, "branch_id": bid}) if as_json else bid)


@txn_app.command("commit")
@secured()
def txn_commit(
    gid: str,
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    as_json: JsonOut = False,
) -> None:
    """Commit: prepare every branch, decide, commit. Exit 1 if it aborted."""
    result = _client_call(coordinator, etcd, lambda c: c.commit(gid), token=token)
    _print_txn(result, as_json)
    if not result.committed:
        _note_spent_key(result, "")
        raise typer.Exit(ExitCode.FAILURE)


@txn_app.command("abort")
@secured()
def txn_abort(
    gid: str,
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    reason: Reason = "",
    as_json: JsonOut = False,
) -> None:
    """Abort a transaction that is not decided yet."""
    _print_txn(
        _client_call(coordinator, etcd, lambda c: c.abort(gid, reason), token=token), as_json
    )


@txn_app.command("execute")
@secured()
def txn_execute(
    branches: Annotated[list[str], typer.Argument(help="SERVICE/OPERATION[:PAYLOAD] ...")],
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    idempotency_key: IdempotencyKey = "",
    timeout_ms: TimeoutMs = 0,
    as_json: JsonOut = False,
) -> None:
    """Begin + enlist + commit in one call. Exit 1 if it aborted."""
    bs = [_branch(b) for b in branches]
    result = _client_call(
        coordinator,
        etcd,
        lambda c: c.execute(bs, idempotency_key=idempotency_key, timeout_ms=timeout_ms),
        token=token,
    )
    _print_txn(result, as_json)
    if not result.committed:
        _note_spent_key(result, idempotency_key)
        raise typer.Exit(ExitCode.FAILURE)


def _saga_steps(file: Path) -> tuple[list[Any], int]:
    """The steps and timeout of a saga file; one line saying what is wrong otherwise."""
    from accord.client import SagaStep

    def bad(problem: str) -> typer.Exit:
        return fail(f"saga file {file}: {problem}", code=ExitCode.USAGE)

    try:
        text = file.read_text()
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise bad(f"not JSON ({e})") from None
    shape = '{"steps": [{"name", "service", "action", "compensation", ...}, ...]}'
    if not isinstance(doc, dict):
        raise bad(f"the top level is a JSON {type(doc).__name__}; expected an object {shape}")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise bad(f'"steps" must be a non-empty list: {shape}')
    timeout_ms = doc.get("timeout_ms", 0)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 0:
        raise bad(f'"timeout_ms" must be a whole number >= 0, not {timeout_ms!r}')
    out = []
    for i, d in enumerate(steps, 1):
        if not isinstance(d, dict):
            raise bad(f"step {i} is a JSON {type(d).__name__}; expected an object")
        missing = [k for k in ("name", "action") if not d.get(k)]
        if not (d.get("service") or d.get("address")):
            missing.append('"service" or "address"')
        if missing:
            raise bad(f"step {i} ({d.get('name') or 'unnamed'}) lacks {', '.join(missing)}")
        try:
            out.append(SagaStep.from_dict(d))
        except (ValueError, TypeError) as e:
            raise bad(f"step {i}: {e}") from None
    return out, timeout_ms


@txn_app.command("saga")
@secured()
def txn_saga(
    file: Annotated[
        Path,
        typer.Option("--file", "-f", envvar="ACCORD_SAGA_FILE", help="saga definition (JSON)"),
    ],
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    idempotency_key: IdempotencyKey = "",
    timeout_ms: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_TXN_TIMEOUT_MS",
            help="the saga's deadline in ms (0: the file's timeout_ms, else the "
            "coordinator's default)",
        ),
    ] = 0,
    wait: Annotated[
        bool,
        typer.Option(
            envvar="ACCORD_SAGA_WAIT",
            help="wait until the saga ends (--no-wait: print only its gid and return)",
        ),
    ] = True,
    as_json: JsonOut = False,
) -> None:
    """Start a saga from a JSON file (--no-wait: print its gid and return).

    The file: {"steps": [{"name", "service" or "address", "action", "compensation", "payload", "depends_on": [...], "pivot", "timeout_ms",
    "retry": {"max_attempts", "initial_interval_ms", "max_interval_ms", "multiplier",
    "final_codes"}}], "timeout_ms": N} (a step is accord.v1.SagaStep in protobuf's JSON
    mapping; a payload is any JSON value, or text). A file that is not such an object
    is refused with exit code 2. Exit 1 unless it COMPLETED (or, with --no-wait, was
    started)."""
    steps, file_timeout_ms = _saga_steps(file)
    result = _client_call(
        coordinator,
        etcd,
        lambda c: c.start_saga(
            steps,
            idempotency_key=idempotency_key,
            timeout_ms=timeout_ms or file_timeout_ms,
            wait=wait,
        ),
        token=token,
    )
    if not wait and not as_json:
        print(result.gid)  # only the gid: gid=$(accord txn saga --file F --no-wait)
    else:
        _print_txn(result, as_json)
    if wait and not result.completed:
        _note_spent_key(result, idempotency_key)
        raise typer.Exit(ExitCode.FAILURE)


@txn_app.command("cancel")
@secured()
def txn_cancel(
    gid: str,
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    reason: Reason = "",
    as_json: JsonOut = False,
) -> None:
    """Cancel a saga before its pivot: what ran is compensated.

    Exit 1 unless it ends COMPENSATED (STUCK: a compensation keeps failing; fix the
    cause, then accord txn retry GID)."""
    result = _client_call(coordinator, etcd, lambda c: c.cancel_saga(gid, reason), token=token)
    _print_txn(result, as_json)
    if not result.compensated:
        raise _not_compensated(result, "cancelled")


@txn_app.command("retry")
@secured()
def txn_retry(
    gid: str,
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    as_json: JsonOut = False,
) -> None:
    """Operator action: try a STUCK saga's compensations again.

    Exit 1 unless it ends COMPENSATED."""
    result = _client_call(coordinator, etcd, lambda c: c.retry(gid), token=token)
    _print_txn(result, as_json)
    if not result.compensated:
        raise _not_compensated(result, "retried")


def _not_compensated(result: Any, what: str) -> typer.Exit:
    hint = "; fix the cause, then: accord txn retry GID" if result.stuck else ""
    return fail(
        f"saga {result.gid} {what} but {result.state}, not COMPENSATED"
        + (f": {result.reason}" if result.reason else "")
        + hint
    )


@txn_app.command("get")
@secured()
def txn_get(
    gid: str,
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    as_json: JsonOut = False,
    query: QueryAddr = "",
) -> None:
    """Show one transaction."""
    if query:
        return _query_get(query, gid, as_json)
    _print_txn(_client_call(coordinator, etcd, lambda c: c.get(gid), token=token), as_json)


def render_txn_list(txns: Sequence[Any], out: Console) -> None:
    """Transactions as a table on a terminal wide enough for every id in full, else (a
    narrow terminal, a pipe, a file) as plain lines: a header, then one transaction a
    line, columns separated by two spaces, ids never cut or wrapped."""
    rows = [
        (t.gid, str(t.state), str(len(t.branches) + len(t.steps)), " ".join(t.reason.split()))
        for t in txns
    ]
    id_width = max((len(r[0]) for r in rows), default=3)
    state_width = max((len(r[1]) for r in rows), default=5)
    # The table's narrowest form: gid and state whole, BRANCHES, a reason column of 16,
    # and the borders and padding of four columns.
    if out.is_terminal and out.width >= id_width + state_width + 8 + 16 + 13:
        table = Table(show_header=True)
        table.add_column("gid", no_wrap=True, min_width=id_width)
        table.add_column("state", no_wrap=True, min_width=state_width)
        table.add_column("branches", justify="right", no_wrap=True)
        table.add_column("reason", overflow="fold")
        for r in rows:
            table.add_row(*r)
        out.print(table)
        return
    plain = [("GID", "STATE", "BRANCHES", "REASON"), *rows]
    widths = [max(len(r[i]) for r in plain) for i in range(3)]
    for r in plain:
        cells = [cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)]
        out.out("  ".join([*cells, r[3]]).rstrip(), highlight=False)


@txn_app.command("list")
@secured()
def txn_list(
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    state: Annotated[
        list[TxnStateChoice] | None,
        typer.Option(
            envvar="ACCORD_TXN_STATES",
            case_sensitive=False,
            metavar="STATE",
            help="only this state (repeatable; any case): " + ", ".join(TxnStateChoice),
        ),
    ] = None,
    stuck: Annotated[
        bool, typer.Option("--stuck", envvar="ACCORD_TXN_STUCK", help="only STUCK sagas")
    ] = False,
    limit: Annotated[
        int, typer.Option(envvar="ACCORD_TXN_LIMIT", help="transactions per page")
    ] = 100,
    # No environment variable: a page token continues one listing.
    page_token: Annotated[
        str, typer.Option(help="continue after this page (printed after a full page)")
    ] = "",
    as_json: JsonOut = False,
    query: QueryAddr = "",
) -> None:
    """List transactions, oldest first (with --query: every shard's, newest first).

    A table on a terminal wide enough for it; otherwise (a narrow terminal, a pipe, a
    file) a header line, then one transaction a line: GID STATE BRANCHES REASON,
    separated by two spaces, ids in full. A full page ends with the next --page-token
    (on stderr)."""
    if query:
        return _query_list(query, [s.value for s in state or ()], stuck, limit, page_token, as_json)
    states = [*(s.value for s in state or ()), *(["STUCK"] if stuck else [])]
    txns, token = _client_call(
        coordinator,
        etcd,
        lambda c: c.list(states=states, limit=limit, page_token=page_token),
        token=token,
    )
    if as_json:
        print(json.dumps({"transactions": [t.to_dict() for t in txns], "next_page_token": token}))
        return
    render_txn_list(txns, console)
    if token:
        err_console.print(f"next page: --page-token {token}", highlight=False, soft_wrap=True)


@txn_app.command("watch")
@secured()
def txn_watch(
    gid: str,
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    as_json: JsonOut = False,
) -> None:
    """Stream a transaction's state changes until it ends."""

    async def go(c: Any) -> None:
        async for t in c.watch(gid):
            if as_json:
                print(json.dumps(t.to_dict()), flush=True)
            else:
                console.print(
                    f"lsn {t.lsn:>8}  {t.state}" + (f"  ({t.reason})" if t.reason else ""),
                    soft_wrap=True,
                )

    _client_call(coordinator, etcd, go, token=token)


@txn_app.command("feed")
@secured()
def txn_feed(
    coordinator: Coordinator = "127.0.0.1:7070",
    etcd: EtcdUrl = "",
    token: Token = "",
    shard: Annotated[
        str, typer.Option(envvar="ACCORD_FEED_SHARD", help="the shard (with --etcd)")
    ] = "",
    from_lsn: Annotated[
        int,
        typer.Option(
            "--from-lsn",
            envvar="ACCORD_FROM_LSN",
            help="events after this LSN (0: from the start of the retained log)",
        ),
    ] = 0,
    limit: Annotated[
        int, typer.Option(envvar="ACCORD_FEED_LIMIT", help="stop after this many events (0: never)")
    ] = 0,
    as_json: JsonOut = False,
) -> None:
    """Print the shard's event feed (Subscribe), one event per line, in LSN order."""
    from google.protobuf.json_format import MessageToDict

    import accord.v1 as pb

    def line(ev: Any) -> str:
        if as_json:
            return json.dumps(MessageToDict(ev, preserving_proto_field_name=True))
        kind = pb.FeedEventKind.Name(ev.kind).removeprefix("FEED_EVENT_KIND_")
        state = pb.TxnState.Name(ev.state).removeprefix("TXN_STATE_") if ev.state else ""
        extra = ""
        if ev.kind == pb.FEED_EVENT_KIND_STEP:
            step = pb.BranchState.Name(ev.step_status.state).removeprefix("BRANCH_STATE_")
            extra = f"step {ev.step} {step}"
        elif ev.reason:
            extra = ev.reason
        return f"{ev.lsn:>10}  {kind:<13} {ev.gid:<36} {state:<12} {extra}".rstrip()

    async def go(c: Any) -> None:
        seen = 0
        async for batch in c.subscribe(from_lsn, shard=shard):
            for ev in batch.events:
                print(line(ev), flush=True)
                seen += 1
                if limit and seen >= limit:
                    return

    _client_call(coordinator, etcd, go, token=token)


# ---------------------------------------------------------------- bank

bank_app = typer.Typer(
    help="The reference bank participant's admin API (accord.bank.v1.Bank): open accounts, "
    "read balances. Money moves only through transactions.",
    no_args_is_help=True,
)
app.add_typer(bank_app, name="bank")

BankAddress = Annotated[
    str,
    typer.Argument(
        metavar="ADDRESS",
        help="the bank's HOST:PORT, or with --etcd the name of a bank service registered there",
        show_default=False,
    ),
]
BankEtcd = Annotated[
    str,
    typer.Option(
        "--etcd",
        envvar="ACCORD_ETCD",
        help="find the bank in etcd (http://host:port): ADDRESS is then a service name",
    ),
]
BANK_TIMEOUT_S = 10.0


def _opening(spec: str) -> tuple[str, int]:
    """NAME=AMOUNT: an account to open and its opening balance (an integer >= 0)."""
    name, sep, amount = spec.partition("=")
    name, amount = name.strip(), amount.strip()
    if not sep or not name:
        raise typer.BadParameter(f"expected NAME=AMOUNT, got {spec!r}")
    try:
        value = int(amount)
    except ValueError:
        raise typer.BadParameter(
            f"{spec!r}: the amount must be a whole number, got {amount!r}"
        ) from None
    if value < 0:
        raise typer.BadParameter(f"{spec!r}: the amount must be >= 0")
    return name, value


def _bank_address(address: str, etcd: str) -> str:
    """HOST:PORT, or the address of a live instance of service ``address`` in etcd."""
    if not etcd:
        if ":" not in address:
            raise fail(
                f"{address!r} is not HOST:PORT; to find a bank service by name, give --etcd URL",
                code=ExitCode.USAGE,
            )
        return address
    from accord.registry import EtcdRegistry

    async def find() -> str:
        registry = EtcdRegistry.from_url(etcd)
        try:
            await registry.start()
            instances = registry.instances(address)
        finally:
            await registry.close()
        if not instances:
            raise LookupError(f"no live instance of service {address!r} registered in {etcd}")
        return instances[0].address

    try:
        return runner.run(find())
    except (LookupError, OSError, ValueError, TimeoutError) as e:
        raise fail(f"bank: {e}") from None


def _bank_call(address: str, call: Callable[[Any], Any]) -> Any:
    """``call(stub)`` on the bank admin service at ``address``; one line on failure."""
    import grpc

    import accord.bank.v1 as bankpb
    from accord.common.transport import make_channel

    async def go() -> Any:
        async with make_channel(address) as channel:
            return await call(bankpb.BankStub(channel))

    try:
        return runner.run(go())
    except grpc.aio.AioRpcError as e:
        raise fail(f"bank at {address}: {e.code().name}: {e.details()}") from None
    except ValueError as e:
        raise fail(f"bank at {address}: {e}") from None


@bank_app.command("open-accounts")
@secured()
def bank_open_accounts(
    address: BankAddress,
    accounts: Annotated[
        list[str],
        typer.Argument(
            metavar="NAME=AMOUNT",
            help="accounts to open and their opening balances (whole numbers >= 0)",
            show_default=False,
        ),
    ],
    etcd: BankEtcd = "",
    as_json: JsonOut = False,
) -> None:
    """Open accounts with their opening balances.

    Idempotent: an account that already exists is left as it is (its balance is not reset, whatever AMOUNT says); the output
    says how many were created and how many existed already."""
    import accord.bank.v1 as bankpb

    try:
        rows = [_opening(a) for a in accounts]
    except typer.BadParameter as e:
        raise fail(str(e), code=ExitCode.USAGE) from None
    names = [n for n, _ in rows]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise fail(f"account named twice: {', '.join(dup)}", code=ExitCode.USAGE)
    target = _bank_address(address, etcd)
    request = bankpb.OpenAccountsRequest(
        accounts=[bankpb.OpenAccount(id=n, balance=b) for n, b in rows]
    )
    resp = _bank_call(target, lambda stub: stub.OpenAccounts(request, timeout=BANK_TIMEOUT_S))
    if as_json:
        print(json.dumps({"created": resp.created, "existing": resp.existing}))
        return
    print(f"created {resp.created}, already existed {resp.existing} (left unchanged)")


@bank_app.command("balances")
@secured()
def bank_balances(
    address: BankAddress,
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="NAME", help="only these accounts (default: every one)"),
    ] = None,
    etcd: BankEtcd = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object: account -> balance")
    ] = False,
) -> None:
    """Print account balances.

    BALANCE is the committed balance, HELD what prepared debits reserve. Exit 1 if a
    named account does not exist."""
    import accord.bank.v1 as bankpb

    target = _bank_address(address, etcd)
    request = bankpb.GetBalancesRequest(ids=names or [])
    resp = _bank_call(target, lambda stub: stub.GetBalances(request, timeout=BANK_TIMEOUT_S))
    missing = sorted(set(names or ()) - {a.id for a in resp.accounts})
    if missing:
        raise fail(f"bank at {target}: no account {', '.join(missing)}")
    if as_json:
        print(json.dumps({a.id: a.balance for a in resp.accounts}))
        return
    rows = [("ACCOUNT", "BALANCE", "HELD")]
    rows += [(a.id, str(a.balance), str(a.held)) for a in resp.accounts]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:  # plain columns, never cut: ids in full for grep and terminals alike
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    print(
        f"total {resp.total} in {resp.count} accounts, held {resp.total_held}, "
        f"prepared branches {resp.prepared_branches}"
    )


# ---------------------------------------------------------------- conformance


@app.command()
@secured()
def conformance(
    participant: Annotated[
        str,
        typer.Option(
            "--participant",
            envvar="ACCORD_PARTICIPANT",
            help="HOST:PORT of the participant to check (any language)",
            show_default=False,
        ),
    ],
    service: Annotated[
        str,
        typer.Option(
            "--service",
            envvar="ACCORD_HEALTH_SERVICE",
            help='the name to ask the standard health service about (default "": the server)',
        ),
    ] = "",
    connect_timeout_s: Annotated[
        float,
        typer.Option(
            "--connect-timeout-s",
            envvar="ACCORD_CONNECT_TIMEOUT_S",
            min=0.1,
            help="give up (exit 1) when the participant is not reachable within this long",
        ),
    ] = 10.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="print one JSON object: rules[] with name, required, passed, evidence"
        ),
    ] = False,
) -> None:
    """Check that a participant keeps Accord's participant contract, rule by rule.

    Drives it as a coordinator would (2PC votes, one-phase commit, saga steps,
    duplicates, an Abort before its Prepare, fencing, malformed calls, Stream, health)
    through its operations conformance.add and conformance.get, and prints each rule's
    result with the calls made and the answers got. Exit 0 only when every required rule
    passes (Stream is optional)."""
    from accord.common.transport import PlainTextRefused, parse_address
    from accord.tools.conformance import render, run_conformance

    try:
        parse_address(participant)
    except ValueError as e:
        raise fail(f"--participant: {e}", ExitCode.USAGE) from None
    try:
        report = runner.run(
            run_conformance(participant, service=service, connect_timeout_s=connect_timeout_s)
        )
    except (ConnectionError, PlainTextRefused) as e:
        raise fail(f"conformance: {e}") from None
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        render(report, console)
    raise typer.Exit(report.exit_code)


# ---------------------------------------------------------------- relay


@app.command()
@secured()
def relay(
    nats: Annotated[
        str,
        typer.Option(
            "--nats", envvar="ACCORD_NATS", help="NATS server URL (nats://host:port[,...])"
        ),
    ],
    coordinator: Annotated[
        list[str] | None,
        typer.Option(
            "--coordinator",
            "-c",
            envvar="ACCORD_COORDINATORS",
            help="a coordinator's host:port (repeatable; its shard is learned from its feed)",
        ),
    ] = None,
    etcd: Annotated[
        str,
        typer.Option(
            "--etcd",
            envvar="ACCORD_ETCD",
            help="follow every shard's owner registered in etcd instead of --coordinator",
        ),
    ] = "",
    stream: Annotated[
        str,
        typer.Option(envvar="ACCORD_STREAM", help="the JetStream stream (created if missing)"),
    ] = "ACCORD",
    fmt: Annotated[
        str,
        typer.Option(
            "--format", envvar="ACCORD_RELAY_FORMAT", help="payload: proto (FeedEvent) or json"
        ),
    ] = "proto",
    duplicate_window_s: Annotated[
        float,
        typer.Option(
            envvar="ACCORD_DUPLICATE_WINDOW_S",
            help="the duplicate window of a stream the relay creates (s)",
        ),
    ] = 120.0,
    refresh_s: Annotated[
        float,
        typer.Option(envvar="ACCORD_REFRESH_S", help="how often etcd's shard map is read (s)"),
    ] = 2.0,
    max_batch: Annotated[
        int, typer.Option(envvar="ACCORD_MAX_BATCH", help="events per feed batch")
    ] = 512,
    connect_wait_s: Annotated[
        float,
        typer.Option(
            envvar="ACCORD_CONNECT_WAIT_S", help="give up if NATS is unreachable this long at start"
        ),
    ] = 30.0,
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="ACCORD_TOKEN",
            help="the relay's token (reader role) for coordinators with auth on",
            show_default=False,
        ),
    ] = "",
    log_level: LogLevelOpt = LogLevel.INFO,
    log_format: LogFormatOpt = LogFormat.TEXT,
) -> None:
    """Publish every shard's event feed to NATS JetStream: subjects
    accord.<shard>.<protocol>.<state>, message id <shard>:<lsn>; resumes after the last
    event the stream holds."""
    import signal

    from accord.relay import Format, Relay, RelaySettings

    setup_logging(log_level, log_format)
    if token:
        os.environ["ACCORD_TOKEN"] = token  # read where the feeds are followed
    try:
        settings = RelaySettings(
            nats_url=nats,
            coordinators=tuple(coordinator or ()),
            etcd=etcd,
            stream=stream,
            fmt=Format(fmt),
            duplicate_window_s=duplicate_window_s,
            refresh_s=refresh_s,
            max_batch=max_batch,
            connect_wait_s=connect_wait_s,
        )
    except ValueError as e:
        raise fail(str(e), code=ExitCode.USAGE) from None

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Relay(settings).run(stop)

    try:
        runner.run(go())
    except Exception as e:
        log.exception("event=relay_failed")
        raise fail(f"relay: {e}") from None


# ---------------------------------------------------------------- demo


@app.command()
def demo(
    transfers: Annotated[
        int, typer.Option(envvar="ACCORD_DEMO_TRANSFERS", help="number of transfers")
    ] = 400,
    concurrency: Annotated[
        int, typer.Option(envvar="ACCORD_DEMO_CONCURRENCY", help="transfers in flight")
    ] = 32,
    accounts: Annotated[
        int, typer.Option(envvar="ACCORD_DEMO_ACCOUNTS", help="accounts per bank")
    ] = 20,
    initial_balance: Annotated[
        int, typer.Option(envvar="ACCORD_DEMO_INITIAL_BALANCE", help="balance of each account")
    ] = 1000,
    seed: Annotated[
        int, typer.Option(envvar="ACCORD_DEMO_SEED", help="replays the same transfers")
    ] = 7,
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="ACCORD_DEMO_DATA_DIR", help="keep data here (default: a temp dir)"),
    ] = None,
    saga: Annotated[
        bool,
        typer.Option(
            "--saga",
            envvar="ACCORD_DEMO_SAGA",
            help="also book trips with sagas (flight, hotel, car)",
        ),
    ] = False,
    static: Annotated[
        bool,
        typer.Option(
            "--static", envvar="ACCORD_DEMO_STATIC", help="a static service map instead of etcd"
        ),
    ] = False,
    postgres: Annotated[
        bool,
        typer.Option(
            "--postgres",
            envvar="ACCORD_DEMO_POSTGRES",
            help="the banks on PostgreSQL: a server the demo starts itself (Debian's "
            "postgresql package), one database per bank",
        ),
    ] = False,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            envvar="ACCORD_DEMO_TLS",
            help="every link over mutual TLS: a development CA and a certificate per "
            "process (accord certs) in the data directory, etcd over https",
        ),
    ] = False,
    as_json: JsonOut = False,
) -> None:
    """The whole topology on this machine (etcd, a coordinator, two bank participants),
    a workload of concurrent transfers, and a summary."""
    from accord.tools._demo import DemoSettings, run_demo

    settings = DemoSettings(
        transfers=transfers,
        concurrency=concurrency,
        accounts=accounts,
        initial_balance=initial_balance,
        seed=seed,
        data_dir=data_dir,
        saga=saga,
        etcd=not static,
        postgres=postgres,
        tls=tls,
    )
    try:
        summary = run_demo(settings, console=None if as_json else console)
    except Exception as e:
        raise fail(f"demo: {e}") from None
    if as_json:
        print(json.dumps(summary))
    if summary["total_before"] != summary["total_after"] or summary["errors"]:
        raise typer.Exit(ExitCode.FAILURE)
    if saga and not all(s["consistent"] for s in summary["sagas"]):
        raise typer.Exit(ExitCode.FAILURE)


@app.command()
def certs(
    out: Annotated[
        Path,
        typer.Option(envvar="ACCORD_CERTS_OUT", help="directory for the CA and certificates"),
    ] = Path("accord-certs"),
    name: Annotated[
        list[str] | None,
        typer.Option(
            envvar="ACCORD_CERTS_NAMES",
            help="a certificate for this name (repeatable; default: coordinator, bank-a, "
            "bank-b, client, query, relay)",
        ),
    ] = None,
    days: Annotated[
        int, typer.Option(envvar="ACCORD_CERTS_DAYS", min=1, help="validity of each certificate")
    ] = 30,
    expired: Annotated[
        list[str] | None,
        typer.Option(
            envvar="ACCORD_CERTS_EXPIRED",
            help="also an already expired certificate for this name (tests; repeatable)",
        ),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Make a development CA (OUT/ca.pem, kept if there) and a certificate and key per
    name (OUT/NAME.pem, OUT/NAME-key.pem).

    Each certificate names NAME (SAN DNS NAME and URI accord:NAME, CN NAME), localhost,
    127.0.0.1 and ::1, for serving and calling. For development and tests: the CA's key
    lies beside it."""
    from accord.common.transport import split_names
    from accord.tools._certs import DEFAULT_NAMES, make_certs

    names = split_names(name or ()) or DEFAULT_NAMES
    try:
        issued = make_certs(out, names, days=days, expired=split_names(expired or ()))
    except (OSError, ValueError) as e:
        raise fail(f"certs: {e}") from None
    if as_json:
        rows = [
            {"name": i.name, "cert": str(i.cert), "key": str(i.key), "serial": f"{i.serial:x}"}
            for i in issued
        ]
        print(json.dumps({"ca": str(out / "ca.pem"), "certificates": rows}))
        return
    print(f"CA: {out / 'ca.pem'}")
    for i in issued:
        print(f"{i.name}: {i.cert} {i.key}")


# `accord chaos [OPTIONS]` runs a test (the group's callback); `accord chaos check` checks
# a saved run. The help is the callback's docstring.
chaos_app = typer.Typer(invoke_without_command=True)
app.add_typer(chaos_app, name="chaos")


@chaos_app.callback()
def chaos(
    ctx: typer.Context,
    duration: Annotated[
        float, typer.Option(envvar="ACCORD_CHAOS_DURATION", help="seconds of load and faults")
    ] = 120.0,
    coordinators: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_CHAOS_COORDINATORS", help="WAL shards (each an owner + a standby)"
        ),
    ] = 2,
    participants: Annotated[
        int, typer.Option(envvar="ACCORD_CHAOS_PARTICIPANTS", help="bank participant services")
    ] = 4,
    seed: Annotated[
        int, typer.Option(envvar="ACCORD_CHAOS_SEED", help="replays the same schedule")
    ] = 1,
    workers: Annotated[
        int, typer.Option(envvar="ACCORD_CHAOS_WORKERS", help="concurrent client operations")
    ] = 8,
    saga_share: Annotated[
        float,
        typer.Option(envvar="ACCORD_CHAOS_SAGA_SHARE", help="share of operations that are sagas"),
    ] = 0.3,
    fault_every: Annotated[
        float,
        typer.Option(envvar="ACCORD_CHAOS_FAULT_EVERY", help="mean seconds between faults"),
    ] = 6.0,
    faults: Annotated[
        Faults,
        typer.Option(
            parser=Faults.parse,
            metavar="FAULT,...",
            envvar="ACCORD_CHAOS_FAULTS",
            help="comma-separated, any of: " + "; ".join(f"{f} ({FAULT_HELP[f]})" for f in Fault),
        ),
    ] = DEFAULT_FAULTS,
    ttl: LeaseTtl = 2,
    participant_db: Annotated[
        ParticipantDb,
        typer.Option(
            envvar="ACCORD_CHAOS_PARTICIPANT_DB",
            case_sensitive=False,
            help="the banks' databases: a SQLite file each, or postgres: one PostgreSQL "
            "server started for the run, a database per bank",
        ),
    ] = ParticipantDb.SQLITE,
    out: Annotated[
        Path | None,
        typer.Option(
            envvar="ACCORD_CHAOS_OUT", help="keep the run here (history, databases, logs)"
        ),
    ] = None,
    as_json: JsonOut = False,
    query: Annotated[
        bool,
        typer.Option(
            "--query",
            envvar="ACCORD_CHAOS_QUERY",
            help="also run a query service; at quiescence its read model must equal the "
            "coordinators' view (a difference is a violation)",
        ),
    ] = False,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            envvar="ACCORD_CHAOS_TLS",
            help="every link over mutual TLS: a development CA and a certificate per "
            "process in the run's directory, etcd over https, allow-lists on the banks",
        ),
    ] = False,
    net: Annotated[
        bool,
        typer.Option(
            "--net",
            envvar="ACCORD_CHAOS_NET",
            help="each process on a host of its own (a network namespace on a bridge; needs "
            "root, `ip netns` and iptables), for the network faults",
        ),
    ] = False,
    etcd_members: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_CHAOS_ETCD_MEMBERS",
            help="etcd members: 1, or a cluster of 3 (or 5), each on its own host with --net",
        ),
    ] = 1,
    net_fault_max: Annotated[
        float,
        typer.Option(
            envvar="ACCORD_CHAOS_NET_FAULT_MAX",
            help="a network fault heals after a seeded time of 2 s up to this many seconds",
        ),
    ] = 6.0,
) -> None:
    """Kill coordinators and participants under a bank workload, then check the history:
    exit 0 only with zero violations. `accord chaos check` checks a saved run again."""
    if ctx.invoked_subcommand is not None:
        return  # the options above are the run's, not the subcommand's
    from accord.tools.chaos import ChaosSettings, run_chaos
    from accord.tools.chaos._harness import validate
    from accord.tools.topology import netns_available

    if duration <= 0 or coordinators < 1 or participants < 2 or workers < 1:
        raise fail("need --duration > 0, --coordinators >= 1, --participants >= 2, --workers >= 1")
    if net and (reason := netns_available()) is not None:
        raise fail(f"--net: {reason}")
    settings = ChaosSettings(
        duration_s=duration,
        coordinators=coordinators,
        participants=participants,
        seed=seed,
        workers=workers,
        saga_share=saga_share,
        fault_every_s=fault_every,
        faults=tuple(f.value for f in faults),
        ttl_s=ttl,
        out_dir=out,
        participant_db=participant_db.value,
        query=query,
        tls=tls,
        net=net,
        etcd_members=etcd_members,
        net_fault_s=(min(2.0, net_fault_max), net_fault_max),
    )
    try:
        validate(settings)
    except ValueError as e:
        raise fail(str(e)) from None
    report = run_chaos(settings, console=None if as_json else console)
    if as_json:
        print(json.dumps(report))
    if report["violations"]:
        raise typer.Exit(ExitCode.FAILURE)


def _named_db(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise typer.BadParameter(f"expected NAME=PATH, got {text!r}", param_hint="'--db'")
    return name, Path(path)


@chaos_app.command("check")
def chaos_check(
    history: Annotated[Path, typer.Argument(help="the JSONL history file")],
    initial: Annotated[
        Path,
        typer.Option(
            envvar="ACCORD_CHAOS_INITIAL",
            help="JSON object: account -> initial balance",
            show_default=False,
        ),
    ],
    db: Annotated[
        list[str] | None,
        typer.Option(
            envvar="ACCORD_CHAOS_DB",
            metavar="NAME=PATH",
            help="a participant service and its SQLite file (repeat per participant)",
        ),
    ] = None,
    coordinator_state: Annotated[
        list[Path] | None,
        typer.Option(
            envvar="ACCORD_CHAOS_COORDINATOR_STATE",
            metavar="FILE",
            help="JSON list of the coordinator's final transactions (repeat per coordinator)",
        ),
    ] = None,
    recovery_bound_s: Annotated[
        float | None,
        typer.Option(
            envvar="ACCORD_CHAOS_RECOVERY_BOUND_S",
            help="longest allowed time from the last heal to quiescence (default: the "
            "checker's, 60)",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[  # no environment variable: an output format, as JsonOut
        bool, typer.Option("--json", help="print the report as JSON")
    ] = False,
) -> None:
    """Check a saved chaos run offline against the participants' final databases.

    Exit code 0: no violations; 1: violations found; 2: the input could not be read."""
    from accord.tools.chaos import (
        DEFAULT_RECOVERY_BOUND_S,
        HistoryError,
        StateError,
        check,
        load_coordinator_state,
        load_initial,
        render_report,
    )

    databases = dict(_named_db(d) for d in db or ())
    try:
        report = check(
            history,
            databases=databases,
            initial=load_initial(initial),
            coordinator_state=[load_coordinator_state(f) for f in coordinator_state or ()],
            recovery_bound_s=(
                DEFAULT_RECOVERY_BOUND_S if recovery_bound_s is None else recovery_bound_s
            ),
        )
    except (HistoryError, StateError, OSError) as e:
        raise fail(str(e), code=ExitCode.USAGE) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_report(report, Console())
    if not report.valid:
        raise typer.Exit(ExitCode.FAILURE)


# ---------------------------------------------------------------- query (read side)

query_app = typer.Typer(invoke_without_command=True)
app.add_typer(query_app, name="query")


@query_app.callback()
@secured()
def query(
    ctx: typer.Context,
    listen: Annotated[
        str, typer.Option(envvar="ACCORD_LISTEN", help="gRPC host:port (port 0 picks one)")
    ] = "127.0.0.1:7300",
    db: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_QUERY_DB", help="the read model: a SQLite file, or postgresql://..."
        ),
    ] = "accord-query.db",
    coordinator: Annotated[
        list[str] | None,
        typer.Option(
            "--coordinator",
            "-c",
            envvar="ACCORD_COORDINATORS",
            help="a coordinator to follow, ADDR or SHARD=ADDR (repeatable; instead of --etcd)",
        ),
    ] = None,
    etcd: Annotated[
        str,
        typer.Option(
            "--etcd",
            envvar="ACCORD_ETCD",
            help="follow every shard's owner registered in etcd, and register there",
        ),
    ] = "",
    http: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_QUERY_HTTP", help="HTTP host:port for /healthz and the console"
        ),
    ] = "",
    instance_id: Annotated[
        str, typer.Option("--id", envvar="ACCORD_ID", help="instance id in etcd")
    ] = "query-1",
    advertise: Advertise = "",
    ttl: LeaseTtl = 5,
    max_lag_events: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_QUERY_MAX_LAG_EVENTS",
            help="/healthz says 503 when a shard is further behind than this",
        ),
    ] = 1000,
    trace_url: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_TRACE_URL",
            help="the console links trace ids to this URL, {trace_id} replaced "
            "(e.g. 'http://jaeger:16686/trace/{trace_id}'); no link when unset",
        ),
    ] = "",
    console_actions: Annotated[
        bool,
        typer.Option(
            envvar="ACCORD_CONSOLE_ACTIONS",
            help="enable the console's retry/cancel saga buttons (with auth on: for admins)",
        ),
    ] = False,
    auth_tokens: AuthTokens = None,
    auth_jwt_key: AuthJwtKey = None,
    auth_jwt_issuer: AuthJwtIssuer = "",
    auth_jwt_audience: AuthJwtAudience = "",
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="ACCORD_TOKEN",
            help="this service's own token (reader role) for the coordinators' feeds",
            show_default=False,
        ),
    ] = "",
    log_level: LogLevelOpt = LogLevel.INFO,
    log_format: LogFormatOpt = LogFormat.TEXT,
    metrics_listen: MetricsListen = "",
    trace_console: TraceConsole = False,
) -> None:
    """The read side: follow every shard's event feed into a store of its own and serve
    accord.v1.Query (and /healthz). `accord query rebuild` rebuilds the store."""
    if ctx.invoked_subcommand is not None:
        return
    from accord.query import QuerySettings, StoreLockedError, serve

    setup_logging(log_level, log_format)
    settings = QuerySettings(
        listen=listen,
        db=db,
        coordinators=tuple(coordinator or ()),
        etcd=etcd,
        http=http,
        instance_id=instance_id,
        advertise=advertise,
        ttl_s=ttl,
        max_lag_events=max_lag_events,
        trace_url=trace_url,
        console_actions=console_actions,
        auth=_auth_settings(auth_tokens, auth_jwt_key, auth_jwt_issuer, auth_jwt_audience),
    )
    if token:
        os.environ["ACCORD_TOKEN"] = token  # read where the feeds are followed
    try:
        settings.check()
        from accord.query._console import check_trace_url

        check_trace_url(trace_url)
        from accord.query import parse_coordinator

        for c in settings.coordinators:
            parse_coordinator(c)
    except ValueError as e:
        raise fail(str(e), code=ExitCode.USAGE) from None
    telemetry = setup_telemetry("accord-query", trace_console, metrics_listen)
    try:
        runner.run(serve(settings, telemetry=telemetry))
    except StoreLockedError as e:
        raise fail(str(e)) from None
    except Exception as e:
        log.exception("event=query_failed")
        raise fail(f"query: {e}") from None
    finally:
        telemetry.shutdown()


@query_app.command("rebuild")
@secured()
def query_rebuild(
    http: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_QUERY_HTTP",
            help="a running query service's HTTP host:port: it rebuilds while it serves",
        ),
    ] = "",
    db: Annotated[
        str,
        typer.Option(
            envvar="ACCORD_QUERY_DB",
            help="with no service running: the store to rebuild (SQLite file or postgresql://)",
        ),
    ] = "",
    coordinator: Annotated[
        list[str] | None,
        typer.Option(
            "--coordinator",
            "-c",
            envvar="ACCORD_COORDINATORS",
            help="ADDR or SHARD=ADDR (repeatable)",
        ),
    ] = None,
    etcd: Annotated[str, typer.Option("--etcd", envvar="ACCORD_ETCD")] = "",
    timeout: Annotated[
        float,
        typer.Option(
            envvar="ACCORD_QUERY_REBUILD_TIMEOUT_S", help="give up after this many seconds"
        ),
    ] = 600.0,
    as_json: JsonOut = False,
) -> None:
    """Rebuild the read model from scratch (from LSN 0 of every shard, or a snapshot
    where the log was checkpointed) into a new store, then swap it in. With --http, a
    running service does it and keeps serving the old store until the swap; with --db,
    no service may be running on that store."""
    from accord.query import StoreLockedError, parse_coordinator, rebuild_offline

    if bool(http) == bool(db):
        raise fail("give --http (a running service) or --db (no service running)", ExitCode.USAGE)
    if http:
        from urllib.error import HTTPError, URLError
        from urllib.request import Request, urlopen

        from accord.common.transport import TransportSettings, https_client_context

        transport = TransportSettings.from_env()
        scheme = "https" if transport.tls or transport.ca else "http"
        context = https_client_context(transport) if scheme == "https" else None
        try:
            with urlopen(
                Request(f"{scheme}://{http}/rebuild", method="POST", data=b""),
                timeout=timeout,
                context=context,
            ) as resp:
                out = json.loads(resp.read())
        except HTTPError as e:
            raise fail(f"rebuild: {e.read().decode(errors='replace')}") from None
        except (URLError, OSError) as e:
            raise fail(f"rebuild: {http}: {e}") from None
    else:
        if bool(coordinator) == bool(etcd):
            raise fail("give --etcd URL or --coordinator ADDR (repeatable)", ExitCode.USAGE)

        async def go() -> dict[str, Any]:
            targets: list[tuple[str, str]]
            if etcd:
                from accord.registry import find_shards

                shards = await find_shards(etcd)
                targets = [(s, c.address) for s, c in sorted(shards.owners.items())]
            else:
                targets = [parse_coordinator(c) for c in coordinator or ()]
            return await rebuild_offline(db, targets, timeout_s=timeout)

        try:
            out = runner.run(go())
        except (StoreLockedError, ValueError, ConnectionError, TimeoutError) as e:
            raise fail(f"rebuild: {e or type(e).__name__}") from None
    if as_json:
        print(json.dumps(out))
    else:
        console.print(
            f"rebuilt {out['transactions']} transactions in {out['seconds']} s "
            f"({', '.join(f'{s}@{n}' for s, n in sorted(out['shards'].items()))})"
        )


def _query_stub(address: str, fn: Any) -> Any:
    import grpc

    import accord.v1 as pb
    from accord.common.transport import make_channel

    async def go() -> Any:
        channel = make_channel(address)
        try:
            return await fn(pb.QueryStub(channel))
        finally:
            await channel.close()

    try:
        return runner.run(go())
    except grpc.aio.AioRpcError as e:
        raise fail(f"query service {address}: {e.code().name}: {e.details()}") from None
    except ValueError as e:
        raise fail(str(e)) from None


def _state_value(name: str) -> int:
    import accord.v1 as pb

    key = name.strip().upper().replace("-", "_")
    key = key if key.startswith("TXN_STATE_") else f"TXN_STATE_{key}"
    try:
        return int(pb.TxnState.Value(key))
    except ValueError:
        raise fail(f"unknown state {name!r}", ExitCode.USAGE) from None


def _query_get(address: str, gid: str, as_json: bool) -> None:
    """``accord txn get --query``: the transaction and its timeline from the read model."""
    from google.protobuf.json_format import MessageToDict

    import accord.v1 as pb

    view = _query_stub(address, lambda stub: stub.GetTransaction(pb.QueryGetRequest(gid=gid)))
    if as_json:
        print(json.dumps(MessageToDict(view, preserving_proto_field_name=True)))
        return
    s = view.summary
    console.print(
        f"state: [bold]{pb.TxnState.Name(s.state).removeprefix('TXN_STATE_')}[/bold]"
        + (f"  reason: {s.reason}" if s.reason else "")
        + f"  shard: {s.shard}  lsn: {s.last_lsn}",
        highlight=False,
    )
    table = Table(title=f"timeline of {s.gid}", show_header=True)
    for col in ("lsn", "kind", "state", "branch", "branch state", "attempts", "error"):
        table.add_column(col)
    for e in view.timeline:
        table.add_row(
            str(e.lsn),
            pb.FeedEventKind.Name(e.kind).removeprefix("FEED_EVENT_KIND_"),
            pb.TxnState.Name(e.state).removeprefix("TXN_STATE_"),
            e.branch,
            pb.BranchState.Name(e.branch_state).removeprefix("BRANCH_STATE_")
            if e.branch_state
            else "",
            f"{e.attempts}+{e.compensation_attempts}" if e.branch else "",
            e.error,
        )
    console.print(table)


def _query_list(
    address: str,
    states: Sequence[str],
    stuck: bool,
    limit: int,
    page_token: str,
    as_json: bool,
) -> None:
    """``accord txn list --query``: every shard's transactions from the read model,
    newest first."""
    from google.protobuf.json_format import MessageToDict

    import accord.v1 as pb

    req = pb.QueryListRequest(
        filter=pb.TransactionFilter(states=[_state_value(s) for s in states], stuck=stuck),  # type: ignore[misc]
        page_size=limit,
        page_token=page_token,
    )
    resp = _query_stub(address, lambda stub: stub.ListTransactions(req))
    if as_json:
        print(
            json.dumps(
                {
                    "transactions": [
                        MessageToDict(t, preserving_proto_field_name=True)
                        for t in resp.transactions
                    ],
                    "next_page_token": resp.next_page_token,
                }
            )
        )
        return
    table = Table(show_header=True)
    for col in ("gid", "state", "services", "ms", "reason"):
        table.add_column(col)
    for t in resp.transactions:
        table.add_row(
            t.gid,
            pb.TxnState.Name(t.state).removeprefix("TXN_STATE_"),
            ",".join(t.services),
            str(t.duration_ms) if t.ended_unix_ms else "",
            t.reason,
        )
    console.print(table)
    if resp.next_page_token:
        console.print(f"next page: --page-token {resp.next_page_token}")


# ---------------------------------------------------------------- load


@app.command()
@secured()
def load(
    coordinator: Annotated[
        str, typer.Option("--coordinator", "-c", envvar="ACCORD_COORDINATOR", help="host:port")
    ] = "",
    etcd: EtcdUrl = "",
    token: Token = "",
    mode: Annotated[
        LoadMode, typer.Option(envvar="ACCORD_LOAD_MODE", help="2PC transfers, sagas, or both")
    ] = LoadMode.TWO_PC,
    concurrency: Annotated[
        int,
        typer.Option(
            envvar="ACCORD_LOAD_CONCURRENCY",
            help="workers (closed loop) or cap on outstanding transactions (open loop)",
        ),
    ] = 16,
    duration: Annotated[
        float | None, typer.Option(envvar="ACCORD_LOAD_DURATION", help="measured seconds")
    ] = None,
    transactions: Annotated[
        int | None, typer.Option(envvar="ACCORD_LOAD_TRANSACTIONS", help="measured transactions")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(envvar="ACCORD_LOAD_RATE", help="open loop: transactions/s on a timetable"),
    ] = None,
    branches: Annotated[
        int, typer.Option(envvar="ACCORD_LOAD_BRANCHES", help="branches (saga steps) per txn")
    ] = 2,
    payload_bytes: Annotated[
        int, typer.Option(envvar="ACCORD_LOAD_PAYLOAD_BYTES", help="pad each payload to ~B bytes")
    ] = 0,
    warmup: Annotated[
        float, typer.Option(envvar="ACCORD_LOAD_WARMUP", help="seconds run first, not measured")
    ] = 0.0,
    json_out: Annotated[
        str, typer.Option("--json", envvar="ACCORD_LOAD_JSON", help="write the report (- stdout)")
    ] = "",
    plot: Annotated[
        Path | None, typer.Option(envvar="ACCORD_LOAD_PLOT", help="draw latency plots (PNG)")
    ] = None,
    processes: Annotated[
        int, typer.Option(envvar="ACCORD_LOAD_PROCESSES", help="generator processes")
    ] = 1,
    services: Annotated[
        str, typer.Option(envvar="ACCORD_LOAD_SERVICES", help="bank services, comma-separated")
    ] = "bank-a,bank-b",
    accounts: Annotated[
        int,
        typer.Option(envvar="ACCORD_LOAD_ACCOUNTS", help="accounts <service>-0..N-1 per bank"),
    ] = 100,
    seed: Annotated[int, typer.Option(envvar="ACCORD_LOAD_SEED")] = 1,
    timeout: Annotated[
        float, typer.Option(envvar="ACCORD_LOAD_TIMEOUT", help="client deadline per txn (s)")
    ] = 30.0,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            envvar="ACCORD_LOAD_PROGRESS",
            help="live progress (default: on a terminal)",
        ),
    ] = None,
) -> None:
    """Load generator: bank transfers (2PC, sagas or both) against a coordinator;
    throughput, latency percentiles (HDR histogram), outcomes, the generator's own CPU.
    The bank services must hold the accounts (accord participant bank --accounts N)."""
    from accord.tools._load import LoadSettings
    from accord.tools._load_view import run_command

    settings = LoadSettings(
        coordinator=coordinator,
        etcd=etcd,
        mode=mode.value,
        concurrency=concurrency,
        duration_s=duration,
        transactions=transactions,
        rate=rate,
        branches=branches,
        payload_bytes=payload_bytes,
        warmup_s=warmup,
        processes=processes,
        services=tuple(x.strip() for x in services.split(",")),
        accounts=accounts,
        seed=seed,
        timeout_s=timeout,
        token=token,
    )
    try:
        settings.validate()
    except ValueError as e:
        raise fail(str(e), code=ExitCode.USAGE) from None
    code = run_command(settings, json_out=json_out, plot=plot, progress=progress)
    if code:
        raise typer.Exit(code)


#: click's base class of usage errors and other reported failures (typer vendors click, so
#: it is reached through one of typer's public names rather than a private module).
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def _invoke(command_app: typer.Typer, prog_name: str, argv: Sequence[str] | None) -> int:
    """Runs ``command_app`` on ``argv`` (default: ``sys.argv[1:]``) and returns its exit
    code. A usage error (a bad option value, a missing argument, an unknown state ...)
    is one line on stderr, exit code 2, like every other refusal of this CLI."""
    try:
        code = command_app(
            args=None if argv is None else list(argv),
            prog_name=prog_name,
            standalone_mode=False,
        )
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except typer.Abort:
        return ExitCode.FAILURE
    except _ClickException as e:
        exit_code = int(getattr(e, "exit_code", ExitCode.USAGE))
        if type(e).__name__ == "NoArgsIsHelpError":
            return exit_code  # the group's help is already printed
        ctx = getattr(e, "ctx", None)
        message = " ".join(str(getattr(e, "format_message", e.__str__)()).split())
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail(message + hint)
        return exit_code
    return code if isinstance(code, int) else ExitCode.OK


def run_standalone(
    command: Callable[..., None], prog_name: str, argv: Sequence[str] | None = None
) -> int:
    """Runs one command of this CLI as a program of its own (``python -m ...``) on
    ``argv`` (default: ``sys.argv[1:]``); returns its exit code."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(command)
    try:
        return _invoke(single, prog_name, argv)
    except SystemExit as e:  # a command that exits the process itself
        if e.code is None or isinstance(e.code, int):
            return e.code or ExitCode.OK
        return ExitCode.FAILURE


# ---------------------------------------------------------------- shard

shard_app = typer.Typer(
    help="The WAL shards of a sharded deployment (in etcd): list them, retire one for good.",
    no_args_is_help=True,
)
app.add_typer(shard_app, name="shard")

ShardEtcd = Annotated[
    str, typer.Option("--etcd", envvar="ACCORD_ETCD", help="etcd URL (http://host:port[,...])")
]


@shard_app.command("list")
@secured()
def shard_list(etcd: ShardEtcd, as_json: JsonOut = False) -> None:
    """Every shard etcd knows: its owner (or last owner), epoch, live, retired.

    ``--json`` adds when and by whom each retired shard was retired."""
    from accord.tools._shard import list_shards

    try:
        m = runner.run(list_shards(etcd))
    except ConnectionError as e:
        raise fail(str(e)) from None
    states = [m.states[s] for s in m.known]
    if as_json:
        print(json.dumps({"shards": [st.to_dict() for st in states]}))
        return
    table = Table(show_header=True)
    for col in ("shard", "owner", "address", "epoch", "live", "retired"):
        table.add_column(col)
    for st in states:
        owner = st.owner if st.live or not st.owner else f"{st.owner} (last)"
        retired = f"yes, {st.retired.kept} keys kept" if st.retired is not None else ""
        table.add_row(
            st.shard, owner, st.address, str(st.epoch), "yes" if st.live else "no", retired
        )
    console.print(table)


@shard_app.command("retire")
@secured()
def shard_retire(
    shard: Annotated[str, typer.Argument(help="the shard to retire")],
    etcd: ShardEtcd,
    wal_dir: Annotated[
        Path, typer.Option(envvar="ACCORD_WAL_DIR", help="the shard's WAL directory")
    ],
    as_json: JsonOut = False,
) -> None:
    """Retire a shard that is gone for good.

    Refused while a coordinator owns it or its WAL holds an unfinished transaction. Keeps in etcd the outcome of every finished
    transaction of the shard that had an idempotency key, then marks it retired:
    clients then answer its keys and gids from etcd and place new keys elsewhere.
    Safe to run again (it finishes an interrupted run; a retired shard stays so)."""
    from accord.common.gid import check_shard_name
    from accord.registry import RetireRefused
    from accord.tools._shard import retire

    try:
        check_shard_name(shard)
    except ValueError as e:
        raise fail(str(e), code=ExitCode.USAGE) from None
    try:
        report = runner.run(retire(shard, etcd, wal_dir))
    except RetireRefused as e:
        raise fail(str(e)) from None
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    r = report.retired
    if report.already:
        console.print(f"shard {shard} is retired already (at {r.at} by {r.by})", highlight=False)
        return
    console.print(
        f"retired shard {shard}: kept the outcomes of {r.kept} idempotency keys "
        f"({r.transactions} finished transactions in {wal_dir}; last owner "
        f"{r.last_owner or 'unknown'}, epoch {r.epoch})",
        highlight=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The ``accord`` program."""
    sys.exit(_invoke(app, "accord", argv))


if __name__ == "__main__":
    main()
