"""Fuzz the server against its own OpenAPI schema: whatever a client sends, no 5xx and no undocumented answer.

Schemathesis reads ``/openapi.json`` from the app (in process, over ASGI), generates requests for every route,
valid by the schema (positive) and not (negative), with and without the API key, and checks every answer: not a
5xx, a status code the schema lists, the declared content type and headers, a body that matches the declared
schema; positive requests with the key must be answered 200, negative ones must be refused with a 4xx.

Bounded and deterministic: about 200 examples in a few seconds, from a fixed seed (hypothesis' derandomize).
Run alone with ``pytest tests/test_serve_fuzz.py -q -s`` to see the figures.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from test_serve_common import results

from workbench.serve.app import ServeSettings, create_app

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")]

KEY = "fuzz-key-12345"
# Examples per (route, mode): /predict gets most, since it parses what clients send.
BUDGET = {("POST /predict", "positive"): 70, ("POST /predict", "negative"): 80}
DEFAULT_BUDGET = {"positive": 18, "negative": 0}  # the other routes take no body nor parameters to negate
TIME_LIMIT_S = 60.0
PROTECTED = {"POST /predict", "GET /model", "POST /admin/reload"}  # the routes behind the API key


def test_no_request_gets_a_5xx_or_an_undocumented_answer():
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.python.asgi import shutdown_lifespans
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_headers_conformance, response_schema_conformance,
                                                   status_code_conformance)

    # Small limits keep generated bodies small (4 rows at most) and reachable (413 for 5 rows or a big body).
    app = create_app(results()[0].onnx_path, ServeSettings(api_key=KEY, poll_seconds=0, max_rows=4,
                                                           max_body_bytes=20_000, body_timeout_s=5.0))
    # A schema-violating request must be refused with a 4xx this server documents (413: over its limits).
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": ["400", "401", "408", "413", "415", "422"]}}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    conformance = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_headers_conformance, response_schema_conformance]
    examples, statuses = Counter(), Counter()
    server_errors, failures = [], []
    started = time.perf_counter()

    def check(case, with_key: bool, mode: str) -> None:
        response = case.call(headers={"X-API-Key": KEY} if with_key else {})
        statuses[response.status_code] += 1
        label = f"{case.operation.label} ({mode}, {'with' if with_key else 'without'} key)"
        if response.status_code >= 500:
            server_errors.append(f"{label}: {response.status_code} {response.text[:200]}")
        checks = conformance + ([negative_data_rejection] if mode == "negative" and with_key else [])
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            sent = f"headers {dict(case.headers or {})}, {case.media_type} body {str(case.body)[:150]}"
            failures.extend(f"{label}: {type(f).__name__}: {f.title}; answered {response.status_code} "
                            f"{response.text[:100]}; sent {sent}" for f in group.exceptions)
        # A schema can bound each number (by float32's range) but not say where the model's own float32
        # arithmetic overflows: that one 422 is the documented exception to "valid means 200".
        overflow = response.status_code == 422 and "infinity or NaN" in response.text
        if mode == "positive" and with_key and response.status_code != 200 and not overflow:
            failures.append(f"{label}: valid by the schema, answered {response.status_code} {response.text[:200]}")
        if not with_key and case.operation.label in PROTECTED and response.status_code != 401:
            failures.append(f"{label}: without the key, answered {response.status_code}")

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations if op.definition.raw.get("security")} == PROTECTED
    plan = [(op, mode, n) for op in operations for mode in ("positive", "negative")
            if (n := BUDGET.get((op.label, mode), DEFAULT_BUDGET[mode]))]
    try:
        for operation, mode, n in plan:
            @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
            def run(case) -> None:
                examples[case.operation.label, mode] += 1
                # Every fifth request goes without the key: the routes behind it must answer 401.
                check(case, examples[case.operation.label, mode] % 5 != 0, mode)

            run()
    finally:
        shutdown_lifespans()  # schemathesis would keep the app's lifespan (our batcher) running
    elapsed = time.perf_counter() - started
    total = sum(examples.values())
    print(f"\nfuzz: {total} examples in {elapsed:.1f} s over {len(examples)} (route, mode) pairs; "
          f"statuses {dict(sorted(statuses.items()))}; 5xx: {len(server_errors)}; "
          f"conformance failures: {len(failures)}")
    assert not server_errors, "\n".join(server_errors[:10])
    assert not failures, "\n".join(sorted(set(failures))[:20])
    assert total >= 150 and elapsed < TIME_LIMIT_S, (total, elapsed)
    # The fuzzing reached the error paths, not only the happy one.
    assert {200, 401, 422} <= set(statuses) and (examples["POST /predict", "negative"] > 0)
