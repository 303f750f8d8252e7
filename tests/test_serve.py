"""edgelm serve, spoken to by the real `openai` client and by raw HTTP: the routes and their shapes, streams that
reassemble to the non-streamed text, errors in OpenAI's shape, slots that reuse a conversation's prefix, the
bounded waiting line, and clients that disconnect mid-stream."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from edgelm.serve import Server, ServerConfig

from .conftest import run_cli

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2):
    with Server(smollm2, port=0, parallel=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _idle(server, timeout: float = 10.0) -> dict:
    """/health once no slot is processing (or the last reading at the timeout)."""
    end = time.monotonic() + timeout
    while True:
        h = httpx.get(server.url + "/health").json()
        if h["slots_processing"] == 0 and h["requests_waiting"] == 0 or time.monotonic() > end:
            return h
        time.sleep(0.05)


def test_chat_matches_the_library_and_streams_reassemble(client, smollm2):
    r = client.chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the server's reply is Model.chat's (same template, same greedy decoding)
    local = smollm2.chat(CHAT, temperature=0, max_tokens=24, session=smollm2.create_session())
    assert text == local.choices[0].message.content
    stream = client.chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same prompt again: its slot held it, only the last prompt token is evaluated
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_completions_with_logprobs(client, smollm2):
    prompt = "The capital of France is"
    r = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=6, logprobs=3)
    c = r.choices[0]
    assert c.text == smollm2.generate(prompt, max_tokens=6, temperature=0, session=smollm2.create_session())
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens
    for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and p <= 0
        assert max(top.values()) == pytest.approx(p)   # greedy: the chosen token is the most likely one
    # independent check of the first token's log-probability: log-softmax of the model's own logits
    import numpy as np
    logits = smollm2.eval_logits(smollm2.tokenize(prompt), session=smollm2.create_session())[-1].astype(np.float64)
    ref = logits.max() - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    assert lp.token_logprobs[0] == pytest.approx(ref, abs=1e-4)
    stream = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=6, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == c.text
    # token ids as the prompt, and echo
    ids = smollm2.tokenize(prompt)
    r2 = client.completions.create(model="any", prompt=ids, temperature=0, max_tokens=6, echo=True)
    assert r2.choices[0].text == prompt + c.text


def test_chat_logprobs_and_stop(client):
    r = client.chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=24, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    s = client.chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in s.choices[0].message.content and s.choices[0].finish_reason == "stop"


def test_models_health_tokenize(server, client, smollm2):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = "Hello <|im_end|> world"
    ids = httpx.post(server.url + "/tokenize", json={"content": text}).json()["tokens"]
    assert ids == smollm2.tokenize(text, add_special=False)            # user text stays text
    assert smollm2.tokenizer.token_to_id["<|im_end|>"] not in ids
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["content"] == text
    pieces = httpx.post(server.url + "/tokenize", json={"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi there"


@pytest.mark.parametrize("body, where", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"model": "x"}).encode(), "messages: Field required"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), "n: "),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
])
def test_malformed_bodies_are_400_with_one_line(server, body, where):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert where in err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"


def test_any_field_with_any_value_is_answered_or_refused_in_one_line(server):
    """Every field of a valid body replaced by values of the wrong type, out of range or not valid Unicode: the
    answer is a completion or a 400 in OpenAI's shape, never a 500, a traceback or a hang."""
    valid = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
             "top_p": 0.9, "top_k": 10, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 1, "stop": ["x"],
             "stream": False, "logprobs": False, "top_logprobs": 1, "n": 1, "stream_options": None}
    pool = [None, -1, 0, 2, 10 ** 30, -(10 ** 30), 0.5, "x", "\ud800", [], {}, [1, "a"], True,
            [{"role": 1}], [{"content": "no role"}], {"include_usage": "yes"}]
    for field in valid:
        for value in pool:
            if field == "max_tokens" and isinstance(value, int) and value > 100:
                continue             # a valid huge max_tokens runs to the end of the context: slow, not wrong
            body = dict(valid, **{field: value})
            r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body),   # "\ud800" escaped
                           headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
            if r.status_code == 400:
                msg = r.json()["error"]["message"]
                assert msg and "\n" not in msg and "Traceback" not in msg
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 400 and "only text parts" in r.json()["error"]["message"]


def test_openai_client_sees_400_and_404(client, server):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="any", messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="any", prompt="word " * 2000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="any", prompt=[10 ** 7], max_tokens=4)
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


def test_api_key_host_and_body_limits(smollm2):
    cfg = ServerConfig(api_key="sekret", max_body=2000)
    with Server(smollm2, port=0, config=cfg) as srv:
        anon = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anon.models.list()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200         # health needs no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data
        r = httpx.post(srv.url + "/tokenize", json={"content": "x" * 5000}, headers={"authorization": "Bearer sekret"})
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
        # a loopback server answers loopback names only (a rebinding web page sends its own Host)
        r = httpx.get(srv.url + "/health", headers={"host": "evil.example:80"})
        assert r.status_code == 400 and "Host" in r.json()["error"]["message"]


def test_second_turns_evaluate_only_new_tokens(server):
    """4 clients x 3 two-turn conversations on 2 slots: every request answered, each second turn finds its
    first turn's tokens in a slot."""
    results, errors = [], []

    def converse(c: int):
        cli = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)
        try:
            for k in range(3):
                msgs = [{"role": "user", "content": f"Client {c}, conversation {k}: name a colour."}]
                r1 = cli.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=12)
                msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And another one?"}]
                r2 = cli.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=12)
                results.append((r1.usage, r2.usage, r2.model_extra["timings"]))
        except Exception as e:          # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=converse, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for u1, u2, timings in results:
        assert u2.prompt_tokens_details.cached_tokens >= u1.prompt_tokens       # the first turn's prompt at least
        assert timings["prompt_n"] == u2.prompt_tokens - u2.prompt_tokens_details.cached_tokens
    assert _idle(server)["slots_processing"] == 0


def test_a_conversation_returns_from_the_prompt_cache(smollm2):
    """One slot, two conversations taking turns: each second turn finds its first turn in the prompt cache, and
    its reply is the one it gets when nothing came in between (the restored K/V are the same bits)."""
    def two_turns(cli, name, other=None):
        msgs = [{"role": "user", "content": f"My name is {name}. Say hello."}]
        r1 = cli.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=16)
        if other:
            other()
        msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "What is my name?"}]
        return r1, cli.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=16)

    with Server(smollm2, port=0, parallel=1) as srv:
        cli = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=120)
        alone1, alone2 = two_turns(cli, "Ada")
    with Server(smollm2, port=0, parallel=1) as srv:
        cli = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=120)
        r1, r2 = two_turns(cli, "Ada", other=lambda: two_turns(cli, "Grace"))
        assert srv.engine.cache.hits >= 1
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens == alone2.usage.prompt_tokens_details.cached_tokens
    assert r2.choices[0].message.content == alone2.choices[0].message.content


def test_disconnected_streams_stop_within_a_token(server):
    engine = server.engine
    before = engine.cancelled_jobs
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    for _ in range(6):
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got >= 4:
                        break
    # a non-streamed request whose client gives up (its read timeout) is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=dict(body, stream=False), timeout=1.0)
    h = _idle(server)
    assert h["slots_processing"] == 0 and h["requests_waiting"] == 0
    assert engine.cancelled_jobs - before == 7
    assert engine.tokens_after_cancel <= 1


def test_full_queue_is_503_with_retry_after(smollm2):
    with Server(smollm2, port=0, parallel=1, max_queue=1) as srv:
        body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as busy:
            lines = busy.iter_lines()            # (kept: a dropped iterator closes the stream)
            next(lines)                          # the slot is taken
            waiting = threading.Thread(target=httpx.post, args=(srv.url + "/v1/completions",),
                                       kwargs=dict(json={"prompt": "Hi", "max_tokens": 2}, timeout=60))
            waiting.start()
            deadline = time.monotonic() + 10
            while httpx.get(srv.url + "/health").json()["requests_waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_error"
        waiting.join()


def test_serve_cli_refuses_a_taken_port_in_one_line(smollm2_path, server):
    r = run_cli("serve", "-m", smollm2_path, "-c", "256", "--port", str(server.port), timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("edgelm: error: cannot listen on 127.0.0.1:")


def test_serve_command_answers_and_stops_on_sigterm(smollm2_path):
    """The real command: the engine on the main thread, HTTP on another; SIGTERM ends it quietly."""
    import os
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", "-m", smollm2_path, "-c", "512", "--port", "0",
                             "-np", "1"], stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stderr.readline()
        while line and "serving" not in line:
            line = proc.stderr.readline()
        url = line.split(" on ")[1].split()[0]                      # http://127.0.0.1:PORT/v1
        client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=8)
        assert r.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
