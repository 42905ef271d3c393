"""The client SDK's import-time dependencies are grpcio, protobuf and opentelemetry-api
only (the base dependencies of the package): in a fresh interpreter where importing
anything else fails, ``import accord.client`` and building an :class:`AccordClient`
(no connection needed) must work. It fails when someone adds e.g. ``import uvloop`` or
``import etcd3aio`` at module level in accord.client or the accord.common modules it uses."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHECK = textwrap.dedent(
    """
    import sys

    # typing_extensions: a dependency of opentelemetry-api.
    ALLOWED = {"grpc", "google", "opentelemetry", "accord", "typing_extensions"}
    # The OpenTelemetry SDK and exporters are not the API; of Google's namespace package
    # only protobuf is a dependency.
    REFUSED = ("opentelemetry.sdk", "opentelemetry.exporter")
    GOOGLE = ("google.protobuf", "google._upb")


    class Refuse:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if (
                (top not in ALLOWED and top not in sys.stdlib_module_names)
                or name.startswith(REFUSED)
                or (top == "google" and name != "google" and not name.startswith(GOOGLE))
            ):
                raise ImportError(f"the client SDK must not import {name!r}")
            return None


    sys.meta_path.insert(0, Refuse())
    import accord.client
    from accord.client import AccordClient, Branch, SagaStep, SyncAccordClient

    client = AccordClient("127.0.0.1:1")
    SagaStep.from_dict({"name": "a", "action": "x", "payload": {"k": 1}})
    Branch(service="bank", operation="debit", payload={"amount": 1}).to_pb()
    print("ok")
    """
)


def test_the_sdk_imports_only_its_base_dependencies() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_check_refuses_what_it_should() -> None:
    for module in ("uvloop", "etcd3aio", "opentelemetry.sdk.trace", "typer", "google.rpc"):
        code = _CHECK.replace("import accord.client\n", f"import accord.client\nimport {module}\n")
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode != 0 and "must not import" in proc.stderr, (module, proc.stderr)
