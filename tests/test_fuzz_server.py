"""Property-based fuzzing of the HTTP API from the server's own OpenAPI document (schemathesis):
requests generated to fit the schema (positive) and to break it (negative) go to a live server
on a tiny random checkpoint. Properties: no 5xx ever; a request that breaks the schema is a 4xx;
every 4xx is OpenAI's error JSON with a message naming the problem; a 200 JSON reply matches the
reply schema; and the server still answers a normal request afterwards. Bounded for CI: few
examples per route, derandomized (the same examples every run), no example database."""

import json
import urllib.request

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from live_server import serve_in_thread
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
)

from qomni import Omni
from qomni.server import Limits, create_app
from qomni.tiny import make_tiny

MODEL = "tiny-omni"
# Small replies: a generated request that fits the schema runs the model, so each must be quick.
LIMITS = Limits(max_request_bytes=1 << 20, max_media_items=2, max_media_seconds=2,
                max_tokens=4, default_max_tokens=4, max_audio_frames=4)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("fuzz") / "tiny")
    served = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
    port, stop = serve_in_thread(create_app(served, model_name=MODEL, limits=LIMITS))
    yield f"http://127.0.0.1:{port}"
    stop()


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(f"{live}/openapi.json")


def openai_error(response) -> None:
    """A 4xx is `{"error": {message, type, param, code}}`, the message non-empty and naming the
    parameter when there is one."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == "invalid_request_error", err
    assert err["param"] is None or isinstance(err["param"], str), err
    if err["param"]:
        root = err["param"].split(".")[0].split("[")[0]
        assert root in err["message"], err


# schemathesis's own pytest integration (`from_fixture`) does not run under pytest 9: the cases
# are drawn from its strategies with hypothesis's `data()` instead.
# Negative cases only where the schema can be broken (a path parameter is any string).
ROUTES = [("POST", "/v1/chat/completions", GenerationMode.POSITIVE, 100),
          ("POST", "/v1/chat/completions", GenerationMode.NEGATIVE, 100),
          ("GET", "/v1/models/{model_id}", GenerationMode.POSITIVE, 5),
          ("GET", "/v1/models", GenerationMode.POSITIVE, 1),
          ("GET", "/health", GenerationMode.POSITIVE, 1)]


@pytest.mark.parametrize(("method", "path", "mode", "examples"), ROUTES,
                         ids=[f"{r[1]}-{r[2].value}" for r in ROUTES])
def test_fuzz_http_api(api, method, path, mode, examples):
    strategy = api[path][method].as_strategy(generation_mode=mode)
    statuses: list[int] = []

    # No shrinking: a failure is reported as found (derandomized, it is found again), so the
    # test stays bounded in time when it fails too.
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        case = data.draw(strategy)
        # Most generated model names are not this server's (a 404 before anything else is
        # read): most cases name the served one, so the rest of the request is exercised.
        if data.draw(st.integers(0, 3), label="served model") < 3:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            if "model_id" in (case.path_parameters or {}):
                case.path_parameters["model_id"] = MODEL
        statuses.append(check(case))

    run()
    if mode is GenerationMode.POSITIVE:  # the cases reached the routes' work, not only checks
        assert 200 in statuses, statuses


def check(case) -> int:
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error, negative_data_rejection,
                                             response_schema_conformance])
    openai_error(response)
    return response.status_code


def test_schema_describes_the_chat_request(api, live):
    with urllib.request.urlopen(f"{live}/openapi.json", timeout=30) as r:
        doc = json.load(r)
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    request = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages"} <= set(request["required"])
    assert request["properties"]["messages"]["minItems"] == 1


def test_still_answers_after_fuzzing(live):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 3}).encode()
    req = urllib.request.Request(f"{live}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        reply = json.load(r)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] >= 1
