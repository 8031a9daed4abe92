"""Schemathesis against a live gateway: openapi.yaml promises nothing the server does not do.

A temporary gateway of its own (the real CLI, KMS worker and TLS, as in every end-to-end test)
is driven by schemathesis's engine, the one behind ``st run``, with every check it has, as
``--checks all`` (no server error, documented statuses, content types, headers and bodies,
schema-violating requests refused, schema-valid requests accepted, deleted resources gone,
authentication not ignored, ...). Every phase runs: the boundary values of every schema
(coverage), generated requests (fuzzing), and call sequences that feed the key ids of
``POST /v1/keys`` into the other operations (stateful).

Not the session's shared gateway: the run fills the KMS with keys, schedules their destruction
and opens the emergency fail-open window, none of which the other end-to-end tests may see.

Bounded for CI: a fixed seed, derandomized generation, no example database, 20 examples per
operation, generation mode and phase, and a wall-clock budget: about 900 coverage cases, 480
generated requests and 60 to 140 stateful steps (they follow the key ids, which are random), some
15 s on two cores. A failure lists every finding with its answer and the curl commands that
reproduce it (shrunk to a minimal example).
"""

from __future__ import annotations

import os
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from schemathesis.engine import events
from schemathesis.engine import from_schema as engine_for
from schemathesis.engine.recorder import ScenarioRecorder
from schemathesis.openapi.checks import RejectedPositiveData, UseAfterFree

from ._gateway import Gateway, init_state, start_gateway

OPENAPI = Path(__file__).resolve().parents[2] / "openapi.yaml"
SEED = 20260601
# QPHER_E2E_SCHEMATHESIS_EXAMPLES=200 runs a longer hunt locally (with its budget scaled).
_LONG_RUN = int(os.environ.get("QPHER_E2E_SCHEMATHESIS_EXAMPLES", "0"))
MAX_EXAMPLES = _LONG_RUN or 20  # per operation, generation mode and phase
TIME_BUDGET_S = 50.0 * max(1, MAX_EXAMPLES // 20)


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("schemathesis") / "state"
    init_state(directory, **{"crypto.backend": "openssl"})
    gw = start_gateway(directory)
    try:
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"gateway exited {code} on SIGTERM"


def _config(gw: Gateway) -> schemathesis.Config:
    # The same settings as `st run --checks all --seed ... --generation-deterministic`, as a
    # schemathesis.toml would hold them. Every check is on by default; `enabled` says so.
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "base-url": f"https://{gw.host}:{gw.port}",
        "tls-verify": str(gw.ca_file),
        "headers": {"Authorization": f"Bearer {gw.demo_key}"},
        "request-timeout": 10,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "checks": {"enabled": True},
        # Reproducers keep key ids and versions (by default every name holding "key" is
        # masked) and still hide the API key.
        "output": {"sanitization": {"keys-to-sanitize": ["authorization", "x-api-key"],
                                    "sensitive-markers": ["authorization", "api-key", "api_key"]}},
    })


# ---- what openapi.yaml states in words where no JSON Schema can ---------------------------------

def _key_dependent_codes() -> dict[str, frozenset[str]]:
    """``"POST /v1/sign" -> codes`` from ``x-qpher-key-dependent-codes``: refusals that depend on
    the key ``key_id`` names, so that a request matching the request schema may still get them."""
    doc = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    out: dict[str, frozenset[str]] = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = op.get("responses", {}).get("400", {}).get("x-qpher-key-dependent-codes") \
                if isinstance(op, dict) else None
            if codes:
                out[f"{method.upper()} {path}"] = frozenset(codes)
    return out


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _stated_by_the_document(failure: Any, case: Any, response: Any,
                            key_dependent: dict[str, frozenset[str]]) -> bool:
    """Whether a reported failure is behaviour openapi.yaml states, though not in a schema.

    * A schema-valid request refused with one of its operation's ``x-qpher-key-dependent-codes``:
      signing with a KEM key, a ciphertext of another algorithm's size, an HPKE ciphertext that
      does not authenticate. Any other refusal of a schema-valid request is still a finding.
    * A key read after ``DELETE /v1/keys/{key_id}``: that DELETE answers 202 and only schedules
      the destruction (RFC 9110 §9.3.5: 202 is a deletion not yet enacted), and a destroyed key
      stays as a tombstone; the document says both. The read must show that state: a key still
      ``enabled`` after its DELETE is still a finding.
    """
    body = _json(response)
    if isinstance(failure, RejectedPositiveData):
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        return response.status_code == 400 and code in key_dependent.get(case.operation.label, ())
    if isinstance(failure, UseAfterFree):
        return isinstance(body, dict) and body.get("state") in ("pending_destruction", "destroyed")
    return False


# ---- the run ----------------------------------------------------------------------------------

def _findings(recorder: ScenarioRecorder) -> list[str]:
    """Every failed check of a scenario: what failed, the answer, and the requests that reproduce it."""
    out: list[str] = []
    for case_id, checks in recorder.checks.items():
        for check in checks:
            info = check.failure_info
            if info is None:
                continue
            failure = info.failure
            response = recorder.find_response(case_id=case_id)
            answer = "(no answer)" if response is None else f"{response.status_code} {response.text[:300]}"
            out.append(f"{recorder.label}: {failure.code} {failure.title}\n"
                       + textwrap.indent(f"{failure.message.strip()}\nanswer: {answer}\nreproduce with:\n"
                                         + textwrap.indent(info.code_sample, "  "), "  "))
    return out


def test_schemathesis_finds_no_difference_between_the_document_and_the_server(live_gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_path(OPENAPI, config=_config(live_gateway))
    key_dependent = _key_dependent_codes()
    assert key_dependent, "openapi.yaml declares no x-qpher-key-dependent-codes"

    @schema.hook
    def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
        return not _stated_by_the_document(failure, case, response, key_dependent)

    findings: list[str] = []
    errors: list[str] = []
    requests: Counter[str] = Counter()
    finished: events.EngineFinished | None = None
    started = time.monotonic()
    stream = engine_for(schema).execute()
    for event in stream:
        if time.monotonic() - started > TIME_BUDGET_S:
            stream.stop()  # the next event is EngineFinished, with stop_reason "interrupted"
        if isinstance(event, events.ScenarioFinished):
            requests[event.phase.value] += len(event.recorder.interactions)
            findings += _findings(event.recorder)
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            finished = event
    elapsed = time.monotonic() - started

    assert not findings, f"{len(findings)} finding(s):\n\n" + "\n\n".join(findings)
    assert not errors, "\n\n".join(errors)
    assert finished is not None, "the engine stopped without finishing"
    assert finished.stop_reason == "completed", (
        f"stopped ({finished.stop_reason}) after {elapsed:.1f} s of a {TIME_BUDGET_S} s budget: "
        f"{dict(requests)}"
    )
    assert {"coverage", "fuzzing", "stateful"} <= {p for p, n in requests.items() if n}, requests
    print(f"\nschemathesis: {sum(requests.values())} requests in {elapsed:.1f} s; by phase {dict(requests)}")
