"""serve.py through the real openai client on 127.0.0.1: answers equal sample.py's and Assistant.answer's, alone,
streamed and concurrent; every bad request gets its OpenAI-shaped error; the judge runs against the server."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

import hf_oracle as hf
import sample
from minillavamed import judge as judge_eval
from minillavamed.inference import Assistant
from minillavamed.serve import Server, ServeConfig, access_warning

NAME = "tiny-llava"
CONTEXT = 2048
QUESTIONS = ["is there an opacity?", "describe the figure in detail please, what is shown in this image?", "where?",
             "is the heart enlarged?", "what is shown?", "a small lesion?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random llava-hf checkpoint with a SentencePiece tokenizer and three PNG images beside it."""
    root = tmp_path_factory.mktemp("serve")
    hf.llava_hf_checkpoint(root, NAME, max_position_embeddings=CONTEXT)
    return root


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return Assistant.load(checkpoint / NAME)


@pytest.fixture(scope="module")
def server(checkpoint, assistant):
    with Server(assistant, ServeConfig(NAME, image_root=checkpoint, max_batch=4), "127.0.0.1", 0) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


def data_url(path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def user(text, image_url=None) -> dict:
    if image_url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def ask(c, messages, **kw):
    return c.chat.completions.create(model=NAME, messages=messages, **{"temperature": 0, "max_tokens": 24, **kw})


def serial(assistant, question, image_path=None, history=(), max_new_tokens=24, **kw) -> str:
    image = None if image_path is None else Image.open(image_path)
    return assistant.answer([question], [image], [list(history)], max_new_tokens=max_new_tokens, **kw)[0]


@pytest.mark.slow
def test_answers_equal_sample_py_and_assistant(checkpoint, assistant, server, capsys):
    c = client(server)
    question, image = QUESTIONS[0], checkpoint / "img0.png"
    assert sample.main(["--model", str(checkpoint / NAME), "--image", str(image), "--prompt", question,
                        "--max_new_tokens", "24"]) == 0
    printed = capsys.readouterr().out.strip()
    r = ask(c, [user(question, data_url(image))])
    assert r.choices[0].message.content == printed == serial(assistant, question, image) and len(printed) > 3
    assert r.model == NAME and r.choices[0].message.role == "assistant"
    prompt = assistant.prompt_ids(question, True)
    assert r.usage.prompt_tokens == len(prompt) - 1 + 16  # the image sentinel is 16 patches
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 24
    # The same image as a JPEG, and as a file under --image_root (plain and file:// paths).
    jpeg = checkpoint / "img1.jpg"
    Image.open(checkpoint / "img1.png").save(jpeg, quality=95)
    for url in (data_url(jpeg), "img1.jpg", f"file://{jpeg}"):
        assert ask(c, [user(QUESTIONS[1], url)]).choices[0].message.content == serial(assistant, QUESTIONS[1], jpeg)
    # Text only, and a multi-turn chat.
    assert ask(c, [user(QUESTIONS[3])]).choices[0].message.content == serial(assistant, QUESTIONS[3])
    history = [(QUESTIONS[0], "there is a small opacity."), (QUESTIONS[2], "in the left lower lobe.")]
    messages = [user(history[0][0], data_url(image)), {"role": "assistant", "content": history[0][1]},
                user(history[1][0]), {"role": "assistant", "content": history[1][1]}, user(QUESTIONS[4])]
    assert ask(c, messages).choices[0].message.content == serial(assistant, QUESTIONS[4], image, history)


def test_models_list(server):
    assert [m.id for m in client(server).models.list().data] == [NAME]


def test_stream_joins_to_the_answer(checkpoint, assistant, server):
    c = client(server)
    for question, image in [(QUESTIONS[1], checkpoint / "img2.png"), (QUESTIONS[2], None)]:
        messages = [user(question, None if image is None else data_url(image))]
        whole = ask(c, messages, max_tokens=40)
        chunks = list(ask(c, messages, max_tokens=40, stream=True, stream_options={"include_usage": True}))
        deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        assert len([d for d in deltas if d]) > 2  # streamed as it was generated, not in one piece
        expected = serial(assistant, question, image, max_new_tokens=40)
        assert "".join(deltas) == whole.choices[0].message.content == expected
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_clients_get_their_serial_answers(checkpoint, assistant, server):
    """Six clients on a batch of four: some wait, rows join and leave mid-decode (different max_tokens)."""
    jobs = [(q, None if k % 3 == 2 else checkpoint / f"img{k % 3}.png", 12 + 5 * k) for k, q in enumerate(QUESTIONS)]
    expected = [serial(assistant, q, im, max_new_tokens=n) for q, im, n in jobs]
    assert len(set(expected)) == len(expected)
    c = client(server)
    got = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(k):
        q, im, n = jobs[k]
        start.wait()
        messages = [user(q, None if im is None else data_url(im))]
        if k % 2:
            got[k] = "".join(ch.choices[0].delta.content or "" for ch in ask(c, messages, max_tokens=n, stream=True))
        else:
            got[k] = ask(c, messages, max_tokens=n).choices[0].message.content

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected


def test_sampling_seed_stop_and_max_tokens(checkpoint, assistant, server):
    c = client(server)
    messages = [user(QUESTIONS[0], data_url(checkpoint / "img0.png"))]
    one, two = (ask(c, messages, temperature=0.9, top_p=0.8, seed=3, max_tokens=30).choices[0].message.content
                for _ in range(2))
    generator = torch.Generator().manual_seed(3)
    alone = serial(assistant, QUESTIONS[0], checkpoint / "img0.png", max_new_tokens=30, temperature=0.9, top_p=0.8,
                   generator=generator)
    assert one == two == alone and alone != serial(assistant, QUESTIONS[0], checkpoint / "img0.png", max_new_tokens=30)
    greedy = serial(assistant, QUESTIONS[0], checkpoint / "img0.png")
    word = greedy.split()[len(greedy.split()) // 2]
    r = ask(c, messages, stop=[word, "zzzz"])
    assert r.choices[0].message.content == greedy.split(word)[0].strip() and r.choices[0].finish_reason == "stop"
    r = ask(c, messages, max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


BAD_REQUESTS = [  # (messages, extra request fields, status, text in the message)
    ([user("hi", "data:image/png;base64,@@@not base64")], {}, 400, "base64"),
    ([user("hi", "data:image/png;base64," + base64.b64encode(b"\x89PNG but truncated").decode())], {}, 400,
     "does not decode"),
    ([{"role": "system", "content": "be brief"}], {}, 400, "no user message"),
    ([user("opacity " * 2500)], {}, 400, "context"),
    ([user("hi")], {"model": "gpt-4o"}, 404, "does not exist"),
    ([user("hi", "../outside.png")], {}, 404, "--image_root"),
    ([user("hi", "missing.png")], {}, 404, "--image_root"),
    ([user("hi", "https://example.com/x.png")], {}, 400, "fetches no URLs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img0.png"}},
                                   {"type": "image_url", "image_url": {"url": "img1.png"}}]}], {}, 400, "one image"),
    ([user("hi", "img0.png"), {"role": "assistant", "content": "ok"}, user("and <image> here?")], {}, 400, "<image>"),
    ([{"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "again"}, user("hi")], {}, 400,
     "alternate"),
    ([user("hi")], {"temperature": 5}, 400, "temperature"),
    ([user("hi")], {"max_tokens": 0}, 400, "max_tokens"),
    ([user("hi")], {"n": 2}, 400, "'n'"),
]


@pytest.mark.parametrize("messages,extra,status,text", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(checkpoint, server, messages, extra, status, text):
    (checkpoint.parent / "outside.png").write_bytes((checkpoint / "img0.png").read_bytes())
    with pytest.raises(openai.APIStatusError) as e:
        client(server).chat.completions.create(**{"model": NAME, "messages": messages, "max_tokens": 4, **extra})
    assert e.value.status_code == status and text in e.value.message
    assert set(e.value.body) == {"message", "type", "param", "code"}  # the client unwraps {"error": {...}}


def raw(server, method, path, body: bytes | None = None, headers=None) -> tuple[int, dict]:
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_bad_http_gets_errors_and_the_server_keeps_serving(checkpoint, assistant, server):
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "POST", "/v1/completions", b"{}", {"Content-Type": "application/json"})[0] == 404
    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in body["error"]["message"]
    assert raw(server, "POST", "/v1/chat/completions", b"[1, 2]")[0] == 400
    assert ask(client(server), [user(QUESTIONS[3])]).choices[0].message.content == serial(assistant, QUESTIONS[3])


def test_oversize_body_is_413(assistant):
    with Server(assistant, ServeConfig(NAME, max_body_bytes=4096), "127.0.0.1", 0) as s:
        with pytest.raises(openai.APIStatusError) as e:
            ask(client(s), [user("x" * 10_000)])
        assert e.value.status_code == 413 and e.value.code == "request_too_large"
        assert ask(client(s), [user(QUESTIONS[3])]).choices[0].message.content == serial(assistant, QUESTIONS[3])


def test_past_max_batch_and_queue_is_503(assistant):
    """max_batch 1: one request decodes, one waits, the third is refused; the first two are then answered."""
    with Server(assistant, ServeConfig(NAME, max_batch=1), "127.0.0.1", 0) as s:
        held = threading.Event()
        admit = s.scheduler.admit
        s.scheduler.admit = lambda jobs: held.wait(60) and admit(jobs)  # the model is busy until released
        c = client(s)
        got = {}
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, ask(c, [user(QUESTIONS[k])])))
                   for k in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while s.scheduler.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.APIStatusError) as e:
            ask(c, [user(QUESTIONS[2])])
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        held.set()
        for t in threads:
            t.join(timeout=60)
        assert [got[k].choices[0].message.content for k in range(2)] == [serial(assistant, QUESTIONS[k])
                                                                         for k in range(2)]
        assert s.scheduler.in_flight == 0


def test_client_that_disconnects_mid_stream_frees_its_slot(assistant, server):
    assert len(assistant.tokenizer.encode(serial(assistant, QUESTIONS[4], max_new_tokens=400))) > 100
    finished = []
    finish = server.scheduler._finish
    server.scheduler._finish = lambda job, *event: finished.append(event[0]) or finish(job, *event)
    try:
        stream = ask(client(server), [user(QUESTIONS[4])], max_tokens=400, stream=True)
        for k, _ in enumerate(stream):
            if k == 3:
                break
        stream.close()
        deadline = time.monotonic() + 30
        while (finished != ["cancelled"] or server.scheduler.in_flight) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finished == ["cancelled"] and server.scheduler.in_flight == 0 and not server.scheduler.rows
    finally:
        server.scheduler._finish = finish


def test_api_key_is_required_when_set(assistant):
    with Server(assistant, ServeConfig(NAME, api_key="s3cret"), "127.0.0.1", 0) as s:
        for key in ("wrong", "unused"):
            with pytest.raises(openai.AuthenticationError):
                client(s, api_key=key).models.list()
        assert raw(s, "GET", "/v1/models")[0] == 401
        assert ask(client(s, api_key="s3cret"), [user(QUESTIONS[3])]).choices[0].message.content
    assert "no authentication" in access_warning("0.0.0.0", None)
    assert "no authentication" in access_warning("my-host.example", None)
    assert access_warning("0.0.0.0", "s3cret") is None and access_warning("127.0.0.1", None) is None
    assert access_warning("localhost", None) is None


def test_sample_py_serve_flags(monkeypatch, checkpoint):
    seen = {}
    monkeypatch.setattr("minillavamed.serve.serve", lambda a, cfg, host, port: seen.update(cfg=cfg, at=(host, port)))
    assert sample.main(["--model", str(checkpoint / NAME), "--serve", "--port", "0", "--served_name", "med",
                        "--max_batch", "2", "--image_root", str(checkpoint)]) == 0
    assert seen["at"] == ("127.0.0.1", 0) and (seen["cfg"].name, seen["cfg"].max_batch) == ("med", 2)
    assert seen["cfg"].image_root == checkpoint
    with pytest.raises(SystemExit):
        sample.main(["--model", str(checkpoint / NAME), "--serve", "--image_root", str(checkpoint / "nowhere")])
    with pytest.raises(SystemExit):
        sample.main(["--model", str(checkpoint / NAME), "--serve", "--prompt", "hi"])


@pytest.mark.slow
def test_sample_py_serve_end_to_end(checkpoint, assistant):
    """The CLI as a user runs it, in its own process: it says where it serves and answers as sample.py."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(Path(sample.__file__)), "--model", str(checkpoint / NAME), "--serve",
                             "--port", str(port), "--served_name", "med"], stderr=subprocess.PIPE, text=True)
    try:
        banner = ""
        for _ in range(50):  # bounded: the banner comes once the socket is bound, after any import warnings
            banner = proc.stderr.readline()
            if "serving" in banner or not banner:
                break
        assert f"http://127.0.0.1:{port}/v1" in banner and "'med'" in banner
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="med", messages=[user(QUESTIONS[3])], temperature=0, max_tokens=24)
        assert r.choices[0].message.content == serial(assistant, QUESTIONS[3])
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_judge_runs_against_the_server(tmp_path, assistant, server, monkeypatch):
    """The judged evaluation end to end offline: our model stands in for GPT-4 as judge. Its replies are not
    two scores, so each row records the parse error quoting the reply's first line, which must be the reply
    Assistant.answer gives to the judge's prompt (system message included)."""
    questions = [{"question_id": f"q{i}", "text": QUESTIONS[i], "fig_caption": "a chest x-ray with an opacity.",
                  "type": "conversation", "domain": "chest_xray", "gpt4_answer": "there is an opacity."}
                 for i in range(2)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"question_id": q["question_id"], "text": "an opacity."})
                                              + "\n" for q in questions))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    assert judge_eval.main(["--questions", str(tmp_path / "q.jsonl"), "--answers", str(tmp_path / "a.jsonl"),
                            "--model", NAME, "--base_url", server.url, "--max_retries", "0", "--backoff_base", "0",
                            "--reviews", str(tmp_path / "reviews.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    judge = dataclasses.replace(assistant, template=dataclasses.replace(assistant.template,
                                                                        system=judge_eval.JUDGE_SYSTEM))
    for q, row in zip(questions, rows):
        body = judge_eval.judge_messages(q, q["gpt4_answer"], "an opacity.")[1]["content"]
        room = CONTEXT - len(assistant.prompt_ids(body, False, system=judge_eval.JUDGE_SYSTEM))
        reply = judge.answer([body], [None], max_new_tokens=min(1024, room))[0]
        first = next((line for line in reply.splitlines() if line.strip()), "")
        expected = f"got {first[:80]!r}" if reply.strip() else "empty message content"
        assert expected in row["error"]
