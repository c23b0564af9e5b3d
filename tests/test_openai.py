"""The OpenAI-compatible front against a real tritonserver, through outside clients: the official `openai`
client (streaming and not), curl, raw HTTP for bad input; per-variant metrics and `deltazip status`."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from click.testing import CliRunner

from deltazip.family import load_eval_set
from deltazip.serving.client import generate_grpc

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
VARIANTS = ("reverse", "sort", "upper")


@pytest.fixture(scope="module")
def oai(live_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live_server.front.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def _prompt(live_server, task: str) -> str:
    return load_eval_set(live_server.family.eval_path(task))[0]["prompt"]


def test_models_list_base_and_variants(live_server, oai):
    models = {m.id: m for m in oai.models.list()}
    base = live_server.front.settings.base_id
    assert base == "base" and {base, *VARIANTS} <= set(models)
    for name in VARIANTS:
        extra = models[name].model_extra
        assert models[name].owned_by == "deltazip" and extra["parent"] == base
        assert extra["bits"] == 2 and extra["ratio"] > 1 and extra["bytes"] > 0
        assert isinstance(extra["resident"], bool)
    assert models[base].model_extra["kind"] == "base"


def test_completions_equal_direct_grpc(live_server, oai):
    for model, task in ((live_server.front.settings.base_id, "reverse"), *((v, v) for v in VARIANTS)):
        prompt = _prompt(live_server, task)
        delta = "" if model == "base" else model
        want = generate_grpc(live_server.triton.grpc_url, prompt, delta, stream=False, max_tokens=MAX_TOKENS)
        got = oai.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens,
                                                                         want.completion_tokens)
        assert got.model == model and got.object == "text_completion"
        pieces, reasons = [], []
        for chunk in oai.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, stream=True):
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        assert "".join(pieces) == want.text and reasons[-1] == want.finish_reason
        if want.completion_tokens >= 3:
            assert sum(1 for p in pieces if p) >= 2  # text arrives in several events


def test_chat_uses_the_template_streaming_and_not(live_server, oai):
    prompt = _prompt(live_server, "reverse")
    want = generate_grpc(live_server.triton.grpc_url, prompt, "reverse", stream=False, max_tokens=MAX_TOKENS)
    messages = [{"role": "user", "content": prompt}]  # one user turn: the template and the fallback agree
    got = oai.chat.completions.create(model="reverse", messages=messages, max_tokens=MAX_TOKENS, seed=1)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == want.completion_tokens and got.object == "chat.completion"
    stream = oai.chat.completions.create(model="reverse", messages=messages, max_tokens=MAX_TOKENS,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].usage.completion_tokens == want.completion_tokens  # include_usage: a last usage chunk


def test_curl_streaming_and_not(live_server):
    url = f"{live_server.front.url}/v1/completions"
    body = {"model": "sort", "prompt": _prompt(live_server, "sort"), "max_tokens": MAX_TOKENS}
    out = subprocess.run(["curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body), url], capture_output=True, text=True, check=True).stdout
    answer = json.loads(out)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["total_tokens"] > 0
    out = subprocess.run(["curl", "-sSN", "--max-time", "60", "-H", "Content-Type: application/json",
                          "-d", json.dumps({**body, "stream": True}), url],
                         capture_output=True, text=True, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == answer["choices"][0]["text"]


def _post(live_server, body, path="/v1/completions", **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(f"{live_server.front.url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json"}, **kwargs)


GOOD = {"model": "reverse", "prompt": "reverse abc=", "max_tokens": 4}


@pytest.mark.parametrize("change, status, match", [
    ({"model": "no-such-variant"}, 404, "does not exist"),
    ({"model": "../reverse"}, 404, "does not exist"),
    ({"model": 7}, 400, "'model' is required"),
    ({"max_tokens": -1}, 400, "'max_tokens' must be in"),
    ({"max_tokens": 10**9}, 400, "'max_tokens' must be in"),
    ({"max_tokens": "4"}, 400, "'max_tokens' must be an integer"),
    ({"max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ({"temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"temperature": 5}, 400, "'temperature' must be in"),
    ({"top_p": 0}, 400, "'top_p' must be in"),
    ({"seed": -3}, 400, "'seed' must be"),
    ({"stop": [1, 2]}, 400, "'stop' must be"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"stream": "yes"}, 400, "'stream' must be a boolean"),
    ({"n": 2}, 400, "'n' must be 1"),
    ({"logprobs": 3}, 400, "'logprobs' is not supported"),
    ({"echo": True}, 400, "'echo' is not supported"),
    ({"prompt": ["a", "b"]}, 400, "one string"),
    ({"prompt": [1, 2, 3]}, 400, "one string"),
    ({"prompt": None}, 400, "'prompt' is required"),
    ({"prompt": "reverse " + "a" * 400 + "="}, 413, "context holds"),
])
def test_bad_completion_requests_get_openai_errors(live_server, change, status, match):
    response = _post(live_server, {**GOOD, **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert match in error["message"] and error["type"] and "code" in error


def test_bad_chat_requests_and_ignored_fields(live_server):
    for messages, match in (("hi", "'messages' is required"), ([{"content": "x"}], "string 'role'"),
                            ([{"role": "tool", "content": "x"}], "not supported"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts")):
        response = _post(live_server, {"model": "reverse", "messages": messages}, path="/v1/chat/completions")
        assert response.status_code == 400 and match in response.json()["error"]["message"]
    # fields outside what the server implements but harmless are ignored (documented): user, metadata, …
    response = _post(live_server, {**GOOD, "user": "u1", "metadata": {"a": "b"}, "presence_penalty": 0,
                                   "some_vendor_field": 1})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]


def test_malformed_large_and_deep_bodies_are_refused_before_triton(live_server):
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be an object"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (b"[" * 60000 + b"]" * 60000, 400, "nested too deeply"),  # the body that crashes Triton's HTTP
        (json.dumps({"model": "reverse", "prompt": "x" * (2 << 20)}).encode(), 413, "limit is"),
        (("{\"a\":" * 100 + "1" + "}" * 100).encode(), 400, "nested too deeply"),
    ]
    for body, status, match in cases:
        response = _post(live_server, body)
        assert response.status_code == status and match in response.json()["error"]["message"], body[:20]
    # chunked (no Content-Length) over the limit is cut off while reading
    response = httpx.post(f"{live_server.front.url}/v1/completions", timeout=60,
                          content=iter([b"{\"prompt\": \"" + b"x" * (1 << 20), b"\"}"]))
    assert response.status_code == 413
    assert _post(live_server, GOOD).status_code == 200  # and the server keeps serving


def test_overloaded_front_answers_503(live_server):
    from fastapi.testclient import TestClient

    from deltazip.serving.openai_api import FrontSettings, create_app

    settings = FrontSettings.from_build(live_server.build_dir, live_server.triton.grpc_url, max_pending=0)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/completions", json=GOOD)
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"


def test_metrics_endpoint_and_status_command(live_server, oai):
    from deltazip.cli import cli
    from deltazip.serving.metrics import parse_prometheus

    for _ in range(2):
        oai.completions.create(model="upper", prompt=_prompt(live_server, "upper"), max_tokens=MAX_TOKENS)
    _post(live_server, {**GOOD, "model": "upper", "prompt": "upper " + "a" * 400 + "="})  # an error
    text = httpx.get(live_server.triton.metrics_url, timeout=30).text
    metrics = parse_prometheus(text)
    assert metrics["requests_total"]["upper"] >= 3 and metrics["request_errors_total"]["upper"] >= 1
    assert metrics["completion_tokens_total"]["upper"] > 0 and metrics["ttft_count_total"]["upper"] >= 2
    assert metrics["swap_ins_total"]["upper"] >= 1 and metrics["disk_loads_total"]["upper"] >= 1
    for name in ("resident_variants", "device_bytes", "host_bytes", "queue_depth"):
        assert name in metrics
    result = CliRunner().invoke(cli, ["status", "--metrics-url", live_server.triton.metrics_url],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "upper" in result.output and "TTFT ms" in result.output and "resident variants" in result.output


def test_chat_template_of_the_family_and_the_fallback(tmp_path):
    """The family tokenizer's template: user turns as they are, assistant turns + EOS, system dropped; a
    tokenizer without a template gets the documented fallback (contents joined by newlines)."""
    from deltazip.family.tokenizer import build_tokenizer
    from deltazip.serving.openai_api import ChatPrompter

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse ab="},
                {"role": "assistant", "content": "ba"}, {"role": "user", "content": "reverse cd="}]
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "with")
    assert ChatPrompter(tmp_path / "with")(messages) == "reverse ab=ba</s>reverse cd="
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "without")
    (tmp_path / "without" / "chat_template.jinja").unlink(missing_ok=True)
    assert ChatPrompter(tmp_path / "without")(messages) == "be brief\nreverse ab=\nba\nreverse cd="


def test_concurrent_requests_share_one_stream_and_errors_stay_alone(live_server):
    """Requests for several variants at once through the front (one gRPC stream, responses matched by
    request id): each gets its own answer; a failing one does not disturb the others."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(v, _prompt(live_server, v)) for v in VARIANTS] * 4
    want = {(v, p): _post(live_server, {"model": v, "prompt": p, "max_tokens": MAX_TOKENS}).json()
            for v, p in set(jobs)}

    def run(i: int):
        if i % 5 == 4:  # every fifth: an error found in the engine (prompt longer than the context)
            return _post(live_server, {"model": "sort", "prompt": "sort " + "b" * 300 + "=", "max_tokens": 4})
        v, p = jobs[i]
        return _post(live_server, {"model": v, "prompt": p, "max_tokens": MAX_TOKENS, "stream": i % 2 == 1})

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, range(len(jobs))))
    for i, response in enumerate(results):
        if i % 5 == 4:
            assert response.status_code == 413
            continue
        assert response.status_code == 200, response.text
        text = (response.json()["choices"][0]["text"] if i % 2 == 0 else
                "".join(json.loads(line[6:])["choices"][0]["text"] for line in response.text.splitlines()
                        if line.startswith("data: {")))
        assert text == want[jobs[i]]["choices"][0]["text"]


def test_variant_lifecycle_needs_loopback_or_the_admin_token(live_server):
    from fastapi.testclient import TestClient

    from deltazip.serving.openai_api import FrontSettings, create_app

    settings = FrontSettings.from_build(live_server.build_dir, live_server.triton.grpc_url,
                                        admin_token="s3cret")
    with TestClient(create_app(settings)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.post("/v1/variants/unload", json={"name": "nope"}, headers=headers)
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
        response = client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"},
                               headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 404  # past the check: the variant is unknown
        assert client.post("/v1/completions", json=GOOD).status_code == 200  # completions need no token
