"""Malformed requests against a real `wft serve`: every answer is a 2xx or OpenAI's 4xx
error body, never a 5xx, and the server stays healthy. A seeded fuzz over both endpoints,
then one test per input that used to reach a 500 or be accepted."""

import copy
import http.client
import json
import random
from urllib.parse import urlparse

import pytest

from tests.serve.client import get, post, running_server

SEED = 20261127
REQUESTS_PER_ENDPOINT = 200
PROMPT = "kiza pa"
COMPLETION = {"prompt": PROMPT, "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
SHARED_FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                 "seed", "stream", "stream_options", "n", "frequency_penalty",
                 "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
                 "decoding", "diffusion_block_size", "diffusion_threshold",
                 "diffusion_steps_per_block"]
FIELDS = {
    "/v1/completions": ["prompt", "echo", "best_of", "suffix", *SHARED_FIELDS],
    "/v1/chat/completions": ["messages", "tools", "functions", "tool_choice",
                             "response_format", *SHARED_FIELDS],
}
# Paths inside a chat body that a mutation may reach (content[0] once content is parts).
CHAT_PATHS = [("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
              ("messages", 0, "content", 0), ("messages", 0, "content", 0, "text"),
              ("messages", 0, "content", 0, "type"), ("messages", 1),
              ("stream_options", "include_usage")]
# Values of the right JSON type at the edges: the ones validation may let through to the
# engine (tiny temperatures, subnormals, int64 bounds, text that is not Unicode).
EDGE_NUMBERS = [0, -0.0, 1e-310, 5e-324, 1e-300, 1e-40, 1e-6, 1, 2, 2.0000001, -1e-310]
EDGE_INTEGERS = [0, 1, 2, -1, 2**63 - 1, -(2**63), 2**63, 10**40]
EDGE_TEXT = ["", "\ud800", "a\udfffb", "\udc00\ud800", "kiza\x00pa", "<|im_end|>", "é ∂ 🙂",
             "x" * 3000, '\\"\n', "kiza pa"]
EDGES = {
    **dict.fromkeys(["temperature", "top_p", "frequency_penalty", "presence_penalty",
                     "diffusion_threshold"], EDGE_NUMBERS),
    **dict.fromkeys(["max_tokens", "max_completion_tokens", "seed", "n", "best_of",
                     "top_logprobs", "diffusion_block_size", "diffusion_steps_per_block"],
                    EDGE_INTEGERS),
    # The served student is not unified: the diffusion modes are refused, "ar" is served.
    "decoding": ["ar", "diffusion", "speculative", "AR", ""],
    **dict.fromkeys(["prompt", "model", "stop", "user", "suffix", "content", "text", "role"],
                    EDGE_TEXT),
}


class Raw:
    """A JSON token json.dumps will not write (an integer past Python's 4300-digit limit,
    a number past float range, nesting deeper than any parser's recursion)."""

    def __init__(self, text: str):
        self.text = text


def _encode(body) -> bytes:
    """JSON as a lenient client might send it: NaN and Infinity literals (json.dumps writes
    them) and lone surrogates as \\uXXXX escapes (json.dumps writes those too)."""
    raws = []

    def placeholder(value):
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@raw{len(raws) - 1}@"
        raise TypeError(type(value))

    text = json.dumps(body, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"', raw)
    return text.encode()


def _odd_value(rng: random.Random):
    depth = rng.choice([3, 900, 5000])
    return rng.choice([
        None, True, False, 0, 1, -1, 3, 2**31, 2**63, -(2**63) - 1, 10**40,
        0.5, 1.0, -0.0, 2.5, 1e-310, 5e-324, 1e-300, 1e308, -1e308,
        float("nan"), float("inf"), float("-inf"),
        Raw("1" + "0" * 5000), Raw("1e400"), Raw("-1e999"), Raw("[" * depth + "]" * depth),
        "", "yes", "true", "1", "NaN", "\ud800", "a\udfffb", "kiza\x00pa", "é ∂ 🙂",
        "x" * 3000,
        [], [None], [1, 2], [PROMPT], [PROMPT, "pa"], [[PROMPT]], ["\ud800"], ["a"] * 9,
        {}, {"a": 1}, {"type": "text", "text": PROMPT}, {"include_usage": "yes"},
        {"include_usage": True}, [{"type": "text", "text": PROMPT}], [{"type": "image_url"}],
        {"role": "user", "content": PROMPT}, {"role": "tool", "content": PROMPT},
        [{"role": "user"}], [{"content": PROMPT}], {"type": "json_object"},
    ])


def _set(body, path, value) -> None:
    """Set `path` inside `body`, turning whatever is in the way into the container needed."""
    node = body
    for key, nxt in zip(path, path[1:]):
        child = node[key] if _has(node, key) else None
        if not isinstance(child, list if isinstance(nxt, int) else dict):
            child = [] if isinstance(nxt, int) else {}
            _put(node, key, child)
        node = child
    _put(node, path[-1], value)


def _has(node, key) -> bool:
    return key in node if isinstance(node, dict) else key < len(node)


def _put(node, key, value) -> None:
    if isinstance(node, dict):
        node[key] = value
    else:
        node.extend([None] * (key + 1 - len(node)))
        node[key] = value


def _value_for(rng: random.Random, field) -> object:
    if field in EDGES and rng.random() < 0.5:
        return rng.choice(EDGES[field])
    return _odd_value(rng)


def _mutated_body(rng: random.Random, endpoint: str):
    """A valid request with one to three fields changed: an edge value, a wrong type,
    missing, nested. One change mostly, so that it, not another, meets the server."""
    chat = endpoint.endswith("chat/completions")
    body = copy.deepcopy(CHAT if chat else COMPLETION)
    body["stream"] = rng.random() < 0.2
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        field = rng.choice(FIELDS[endpoint] + ["an_unknown_field"])
        move = rng.random()
        if chat and move < 0.25:
            path = rng.choice(CHAT_PATHS)
            _set(body, path, _value_for(rng, path[-1]))
        elif move < 0.75:
            body[field] = _value_for(rng, field)
        elif move < 0.85:
            body.pop(field, None)
        else:
            body[field] = rng.choice([[body.get(field)], {"value": body.get(field)}])
    return body


def _raw_request(rng: random.Random, endpoint: str) -> tuple[bytes, str | None]:
    """A body that is not the JSON object asked for, or sent as something else."""
    valid = _encode(CHAT if endpoint.endswith("chat/completions") else COMPLETION)
    return rng.choice([
        (valid[: rng.randrange(len(valid))], "application/json"),  # cut short
        (valid.replace(b"kiza", b"ki\xff\xfeza"), "application/json"),  # not UTF-8
        (valid.replace(b"kiza", b"ki\\uZZZZza"), "application/json"),  # bad escape
        (b"", "application/json"),
        (b"[]", "application/json"),
        (b'"kiza"', "application/json"),
        (b"null", "application/json"),
        (b"NaN", "application/json"),
        (b"[" * 100_000, "application/json"),
        (valid, "text/plain"),
        (valid, "application/x-www-form-urlencoded"),
        (valid, None),
        (valid, "application/json; charset=utf-16"),
        (valid.decode().encode("utf-16"), "application/json"),
        (b"prompt=kiza", "application/x-www-form-urlencoded"),
        (valid + b" trailing", "application/json"),
        (valid.replace(b"{", b"{" + b'"a": 1, ' * 5000, 1), "application/json"),
    ])


def _send(base: str, endpoint: str, data: bytes, content_type: str | None):
    address = urlparse(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", endpoint, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def _check_answer(endpoint: str, status: int, content_type: str, raw: bytes, sent: bytes):
    what = f"{endpoint} {sent[:300]!r} -> {status} {raw[:300]!r}"
    assert 200 <= status < 500, what
    if content_type.startswith("text/event-stream"):
        events = [line[len(b"data: "):] for line in raw.splitlines()
                  if line.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", what
        assert not any(b'"error"' in event for event in events), what
        return
    body = json.loads(raw)
    if status < 300:
        assert body["choices"], what
        return
    assert set(body) == {"error"}, what
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, what
    assert error["type"] == "invalid_request_error" and error["message"], what
    assert "Traceback" not in error["message"], what
    if error["param"] is not None:  # names a field of the request
        field = error["param"].split("[")[0].split(".")[0]
        assert field in FIELDS[endpoint], what


@pytest.fixture(scope="module")
def server(qwen3_student):
    path, _ = qwen3_student
    output = []
    with running_server(str(path), "--max-tokens", "8", "--max-prompt-tokens", "64",
                        "--model-name", "student", output=output) as base:
        yield base, output


@pytest.mark.parametrize("endpoint", list(FIELDS))
def test_fuzzed_requests_never_get_a_5xx(server, endpoint):
    base, output = server
    rng = random.Random(f"{SEED}{endpoint}")
    statuses = []
    for _ in range(REQUESTS_PER_ENDPOINT):
        if rng.random() < 0.15:
            data, content_type = _raw_request(rng, endpoint)
        else:
            data, content_type = _encode(_mutated_body(rng, endpoint)), "application/json"
        status, answer_type, raw = _send(base, endpoint, data, content_type)
        _check_answer(endpoint, status, answer_type, raw, data)
        statuses.append(status)
    assert statuses.count(400) > len(statuses) // 3  # the fuzz mostly breaks requests...
    assert any(200 <= s < 300 for s in statuses)  # ...but not all of them
    status, health = get(base + "/health")
    assert status == 200 and health["requests_in_flight"] == 0
    status, body = post(base + "/v1/completions", COMPLETION)
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert "Traceback" not in "".join(output), "".join(output)[-3000:]


def _send_json(base: str, endpoint: str, body) -> tuple[int, dict]:
    status, _, raw = _send(base, endpoint, _encode(body), "application/json")
    return status, json.loads(raw)


@pytest.mark.parametrize("endpoint,body,param", [
    ("/v1/completions", {"prompt": "kiza \ud800"}, "prompt"),
    ("/v1/completions", {"prompt": [PROMPT + "\udc00"]}, "prompt[0]"),
    ("/v1/completions", {"prompt": PROMPT, "stop": "\ud800"}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["pa", "\ud800"]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT},
                                           {"role": "assistant", "content": "\ud800"}]},
     "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
])
def test_a_lone_surrogate_is_refused_naming_the_field(server, endpoint, body, param):
    status, error = _send_json(server[0], endpoint, body)
    assert status == 400, error
    assert error["error"]["param"] == param
    assert "surrogate" in error["error"]["message"]


@pytest.mark.parametrize("endpoint", list(FIELDS))
def test_tiny_temperature_and_top_p_sample_greedily(server, endpoint):
    base = server[0]
    request = {**(CHAT if "chat" in endpoint else COMPLETION), "max_tokens": 8}
    status, greedy = post(base + endpoint, {**request, "temperature": 0})
    assert status == 200, greedy
    for sampling in ({"temperature": 1e-310}, {"temperature": 5e-324},
                     {"top_p": 1e-300, "temperature": 2, "seed": 1},
                     {"top_p": 5e-324, "temperature": 1}):
        status, body = post(base + endpoint, {**request, **sampling})
        assert status == 200, (sampling, body)
        assert body["choices"] == greedy["choices"], sampling


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, [], {}])
def test_stream_must_be_a_json_boolean(server, value):
    status, error = post(server[0] + "/v1/completions", {**COMPLETION, "stream": value})
    assert status == 400 and error["error"]["param"] == "stream"
    assert error["error"]["message"] == "stream: must be true or false"


@pytest.mark.parametrize("field,literal", [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"),
    ("top_p", "-Infinity"), ("temperature", "1e400"),
])
def test_numbers_must_be_finite(server, field, literal):
    data = json.dumps({**COMPLETION, field: "@"}).replace('"@"', literal).encode()
    status, _, raw = _send(server[0], "/v1/completions", data, "application/json")
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == field
    assert error["message"] == f"{field}: must be a finite number"


@pytest.mark.parametrize("body,param,message", [
    ({**COMPLETION, "max_tokens": 2.0}, "max_tokens", "must be an integer"),
    ({**COMPLETION, "seed": True}, "seed", "must be an integer"),
    ({**COMPLETION, "seed": 2**64}, "seed", "must be less than"),
    ({**COMPLETION, "n": "1"}, "n", "must be an integer"),
    ({**COMPLETION, "temperature": "0.5"}, "temperature", "must be a number"),
    ({**COMPLETION, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "must be true or false"),
    ({"prompt": 5}, "prompt", "must be a string or an array"),
    ({"prompt": [PROMPT, 5]}, "prompt[1]", "must be a string"),
])
def test_completion_types_are_strict(server, body, param, message):
    status, error = post(server[0] + "/v1/completions", body)
    assert status == 400 and error["error"]["param"] == param
    assert message in error["error"]["message"]


@pytest.mark.parametrize("messages,param,message", [
    ("kiza", "messages", "must be an array"),
    ([], "messages", "at least 1 item"),
    (["kiza"], "messages[0]", "must be an object"),
    ([{"content": PROMPT}], "messages[0].role", "is required"),
    ([{"role": "user"}], "messages[0].content", "is required"),
    ([{"role": "tool", "content": PROMPT}], "messages[0].role", "'user'"),
    ([{"role": "user", "content": 5}], "messages[0].content",
     "must be a string or an array"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type", 'not supported by this server (accepted: "text"'),
])
def test_chat_messages_are_checked_to_the_leaf(server, messages, param, message):
    status, error = post(server[0] + "/v1/chat/completions", {"messages": messages})
    assert status == 400 and error["error"]["param"] == param, error
    assert message in error["error"]["message"]


def test_null_asks_for_the_default(server):
    status, body = post(server[0] + "/v1/completions",
                        {**COMPLETION, "temperature": None, "top_p": None, "stream": None,
                         "n": None, "stop": None, "seed": None})
    assert status == 200, body
