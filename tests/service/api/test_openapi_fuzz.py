"""A bounded schemathesis run against a real server's /openapi.json: no 5xx, and every answer (status, content
type, body, headers) is the one the document declares. ~200 cases in all, positive and negative, with the
bearer token a production service has; plus each operation once without it (the documented 401)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import schemathesis
from api_helpers import Service
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from safetensors.numpy import save_file
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 18, GenerationMode.NEGATIVE: 8}  # per operation; ~200 cases for 8 routes


@pytest.fixture
def fuzzed(make_service) -> Service:
    # Small limits keep every generated request cheap: at most 4,096 decoded tokens, 4 prompts, 64 KiB bodies.
    service = make_service(
        api_token=TOKEN, max_request_tokens=4096, max_prompts_per_request=4, max_request_bytes=64 * 2**10
    )
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(service.settings.weights_dir / "w.safetensors"))
    return service


def _runner(
    operation: Any, mode: GenerationMode, examples: int, url: str, headers: dict
) -> Callable[[], None]:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS)

    return run


def _explore(run: Callable[[], None], label: str, failures: list[str]) -> None:
    try:
        run()
    except Unsatisfiable:  # no invalid input exists (an operation without parameters or body)
        pass
    except (Exception, BaseExceptionGroup) as exc:  # every operation's first failure, reported together
        failures.append(f"{label}: {exc}")


@pytest.mark.slow
def test_every_operation_answers_as_documented(fuzzed: Service) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            run = _runner(operation, mode, examples, fuzzed.url, AUTH)
            _explore(run, f"{operation.label} [{mode.value}]", failures)
        without_token = _runner(operation, GenerationMode.POSITIVE, 1, fuzzed.url, {})
        _explore(without_token, f"{operation.label} [no token]", failures)
    assert not failures, "\n\n".join(failures)
