"""End-to-end tests for generate_data.py: the real script as a subprocess, the real openai client over real
HTTP against tests/openai_stub.py on 127.0.0.1. Every input id must end exactly once in OUT or failures."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub import StubServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-key-4242"


def make_input(path: Path, n: int, jsonl: bool = True) -> list[str]:
    ids = [f"id{i:02d}" for i in range(n)]
    recs = [{"pair_id": pid, "image": f"{pid}.jpg", "fig_label": f"Fig. {i}",
             "fig_caption": f"Axial CT ({pid}) showing a nodule in the right lung.",
             **({"in_text_mention": [f"Fig. {i} shows the nodule ({pid})."]} if i % 2 == 0 else {}),
             "domain": {"ct_scan": True}} for i, pid in enumerate(ids)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n" if jsonl else json.dumps(recs))
    return ids


def gen_cmd(tmp: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "generate_data.py"), "--input", str(tmp / "in.jsonl"),
            "--output", str(tmp / "out.jsonl"), "--base_url", url, "--model", "stub-gpt-4",
            "--backoff_base", "0.01", "--progress_seconds", "0", *extra]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_OPENAI", "OPENAI_"))}
    e.update(OPENAI_API_KEY=KEY, PYTHONPATH=str(ROOT), **extra)
    return e


def pid(request: dict) -> str:
    """The pair_id a stub request was about (make_input writes it into every caption)."""
    return re.search(r"\((id\d\d)\)", request["query"]).group(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def check_llava_records(records: list[dict]) -> None:
    """The schema train.py reads: id, image, alternating human/gpt turns, one <image> at the first question's
    start or end."""
    for r in records:
        assert isinstance(r["id"], str) and r["image"] == r["id"] + ".jpg"
        conv = r["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in conv)
        first = conv[0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        assert sum(t["value"].count("<image>") for t in conv) == 1


def assert_exactly_once(ids, out_rows, fail_rows):
    got = [r["id"] for r in out_rows] + [r["id"] for r in fail_rows]
    assert sorted(got) == sorted(ids), "every input id must be in output or failures exactly once"


def test_normal_run_then_rerun_pays_nothing(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 6)
    with StubServer() as stub:
        res = run(gen_cmd(tmp_path, stub.url, "--concurrency", "3", "--inline_mentions"))
        assert res.returncode == 0, res.stderr
        out = rows(tmp_path / "out.jsonl")
        assert sorted(r["id"] for r in out) == ids and rows(tmp_path / "out.jsonl.failures.jsonl") == []
        check_llava_records(out)
        assert out[0]["domain"] == {"ct_scan": True}
        assert out[0]["conversations"][1]["value"] == "This is an axial CT slice of the chest."
        assert len(stub.requests) == 6 and all(r["auth"] == f"Bearer {KEY}" for r in stub.requests)
        queries = {pid(r): r["query"] for r in stub.requests}
        assert "Figure Context:\n- Fig. 0 shows the nodule (id00)." in queries["id00"]
        assert "Figure Context" not in queries["id01"]  # no mentions in this record
        assert "6/6 (0 failed)" in res.stderr and "tokens 600 in / 120 out" in res.stderr
        assert "$0.03" in res.stderr  # 600*30/1e6 + 120*60/1e6 = 0.0252

        # The output feeds train.py as is: its dataset reader tokenizes every conversation.
        from minillavamed.conversation import get_template
        from minillavamed.data import ConversationDataset, ImageProcessor, load_records
        from minillavamed.tokenizer import train_tokenizer

        texts = [t["value"] for r in out for t in r["conversations"]]
        tok = train_tokenizer(texts * 5, tmp_path / "tok", vocab_size=400)
        ds = ConversationDataset(load_records(tmp_path / "out.jsonl"), tmp_path, get_template("vicuna_v1"), tok,
                                 ImageProcessor(), max_len=4096, num_image_tokens=16, source="out.jsonl")
        assert len(ds.samples) == 6 and not ds.dropped

        before = (tmp_path / "out.jsonl").read_bytes()
        res = run(gen_cmd(tmp_path, stub.url))
        assert res.returncode == 0 and len(stub.requests) == 6  # nothing requested twice
        assert (tmp_path / "out.jsonl").read_bytes() == before


@pytest.mark.slow
def test_faults_are_retried_or_recorded_then_retry_failed(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 8)
    plan = {"id00": ["429", "ok"], "id01": ["500", "500", "ok"], "id02": ["500"], "id03": ["slow", "ok"],
            "id04": ["malformed", "ok"], "id05": ["refusal"], "id06": ["sorry"]}
    with StubServer(plan=plan, retry_after="1", slow_s=3.0) as stub:
        res = run(gen_cmd(tmp_path, stub.url, "--concurrency", "4", "--max_retries", "2", "--timeout", "0.5"))
        assert res.returncode == 0, res.stderr
        out, fails = rows(tmp_path / "out.jsonl"), rows(tmp_path / "out.jsonl.failures.jsonl")
        assert_exactly_once(ids, out, fails)
        assert sorted(r["id"] for r in out) == ["id00", "id01", "id03", "id04", "id07"]
        check_llava_records(out)
        reasons = {r["id"]: r["reason"] for r in fails}
        assert "gave up after 3 attempts" in reasons["id02"] and "500" in reasons["id02"]
        assert reasons["id05"].startswith("refusal") and reasons["id06"].startswith("refusal")
        assert len(stub.requests_for("id02")) == 3  # 1 + --max_retries
        t429, t_ok = [r["time"] for r in stub.requests_for("id00")]
        assert t_ok - t429 >= 0.9  # Retry-After: 1 honoured although the backoff base is 0.01 s
        assert "8/8 (3 failed)" in res.stderr

    with StubServer() as stub:  # the failures are redone on request only
        assert run(gen_cmd(tmp_path, stub.url)).returncode == 0 and stub.requests == []
        res = run(gen_cmd(tmp_path, stub.url, "--retry_failed"))
        assert res.returncode == 0, res.stderr
        assert sorted(pid(r) for r in stub.requests) == ["id02", "id05", "id06"]
    out, fails = rows(tmp_path / "out.jsonl"), rows(tmp_path / "out.jsonl.failures.jsonl")
    assert fails == [] and sorted(r["id"] for r in out) == ids


@pytest.mark.slow
def test_killed_mid_run_then_restarted(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 30, jsonl=False)  # a JSON array input this time
    (tmp_path / "in.jsonl").rename(tmp_path / "in.json")
    cmd = gen_cmd(tmp_path, "URL", "--concurrency", "2")
    cmd[cmd.index("--input") + 1] = str(tmp_path / "in.json")
    out_path = tmp_path / "out.jsonl"
    with StubServer(ok_delay_s=0.1) as stub:
        cmd[cmd.index("--base_url") + 1] = stub.url
        proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (not out_path.exists() or out_path.read_text().count("\n") < 6) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = [r["id"] for r in rows(out_path)]
        assert 6 <= len(done_before) < 30
        torn_id = next(i for i in ids if i not in done_before)
        with open(out_path, "ab") as f:  # what a kill in the middle of a write leaves behind
            f.write(json.dumps({"id": torn_id, "image": f"{torn_id}.jpg"}).encode()[:25])
        n_before = len(stub.requests)

        res = run(cmd)
        assert res.returncode == 0, res.stderr
        after = [pid(r) for r in stub.requests[n_before:]]
    out, fails = rows(out_path), rows(tmp_path / "out.jsonl.failures.jsonl")
    assert_exactly_once(ids, out, fails)
    assert fails == []
    check_llava_records(out)
    assert torn_id in after  # the torn record was redone ...
    assert not set(after) & set(done_before)  # ... and nothing finished before the kill was paid for again


@pytest.mark.slow
def test_api_key_never_leaks_and_auth_errors_stop_the_run(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 3)
    with StubServer(plan={"id00": ["echo_auth"]}) as stub:
        res = run(gen_cmd(tmp_path, stub.url))
        assert res.returncode == 0, res.stderr
    fails = rows(tmp_path / "out.jsonl.failures.jsonl")
    assert [r["id"] for r in fails] == ["id00"] and "Bearer [redacted]" in fails[0]["reason"]
    for text in (res.stdout, res.stderr, (tmp_path / "out.jsonl").read_text(),
                 (tmp_path / "out.jsonl.failures.jsonl").read_text()):
        assert KEY not in text

    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "out.jsonl.failures.jsonl").unlink()
    with StubServer(plan={i: ["401"] for i in ids}) as stub:
        res = run(gen_cmd(tmp_path, stub.url, "--concurrency", "1"))
    assert res.returncode == 2 and "HTTP 401" in res.stderr and KEY not in res.stderr + res.stdout
    # A run stopped by a fatal error marks nothing as failed: the records are simply still to do.
    assert rows(tmp_path / "out.jsonl") == [] and rows(tmp_path / "out.jsonl.failures.jsonl") == []


def test_dry_run_uses_no_network(tmp_path):
    make_input(tmp_path / "in.jsonl", 5)
    with StubServer() as stub:
        res = run(gen_cmd(tmp_path, stub.url, "--dry_run", "--limit", "2", "--inline_mentions"))
        assert res.returncode == 0, res.stderr and stub.requests == []
        assert stub.requests == []
    messages = json.loads(res.stdout[:res.stdout.index("\n[dry run]")])
    assert messages[0]["role"] == "system" and "Figure Context:\n- Fig. 0" in messages[-1]["content"]
    assert "[dry run] 2 requests; estimated tokens (chars/4)" in res.stdout and "estimated cost $" in res.stdout
    assert not (tmp_path / "out.jsonl").exists()


def test_alignment_mode_needs_no_api(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 5)
    cmd = [sys.executable, str(ROOT / "generate_data.py"), "--mode", "alignment", "--input",
           str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "align.jsonl"), "--limit", "3"]
    e = env()
    del e["OPENAI_API_KEY"]
    for _ in range(2):  # a re-run adds nothing
        assert subprocess.run(cmd, env=e, capture_output=True, timeout=60).returncode == 0
    out = rows(tmp_path / "align.jsonl")
    assert [r["id"] for r in out] == ids[:3]
    check_llava_records(out)
    assert out[1]["conversations"][1]["value"] == "Axial CT (id01) showing a nodule in the right lung."


@pytest.mark.parametrize("lines,message", [
    (['{"pair_id": "a", "image": "a.jpg", "fig_caption": "x"}', '{"pair_id": "b", "image": "b.jpg"}'],
     "in.jsonl:2: missing or empty 'fig_caption'"),
    (['{"pair_id": "a", "image": "a.jpg", "fig_caption": "x"}', '{"pair_id": "a", "image": "a.jpg", "fig_caption": "y"}'],
     "in.jsonl:2: duplicate pair_id 'a'"),
    (['{"pair_id": "a", "image": "a.jpg", "fig_caption": "x"}', '{"pair_id": '], "in.jsonl:2: not valid JSON"),
])
def test_bad_input_names_file_and_line(tmp_path, lines, message):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    res = run(gen_cmd(tmp_path, "http://127.0.0.1:9/v1"))
    assert res.returncode != 0 and message in res.stderr


@pytest.mark.slow
def test_refused_connections_stop_the_run_and_are_retried_by_the_next(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 5)
    res = run(gen_cmd(tmp_path, "http://127.0.0.1:9/v1", "--max_retries", "1"))  # nothing listens on port 9
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert "no server answered at http://127.0.0.1:9/v1" in last and "connection error" in last
    assert "check --base_url" in last
    fails = rows(tmp_path / "out.jsonl.failures.jsonl")
    assert {r["kind"] for r in fails} == {"connection"} and rows(tmp_path / "out.jsonl") == []

    with StubServer() as stub:
        res = run(gen_cmd(tmp_path, stub.url))
    assert res.returncode == 0, res.stderr
    assert f"retrying {len(fails)} record(s) that failed because no server answered" in res.stderr
    assert_exactly_once(ids, rows(tmp_path / "out.jsonl"), rows(tmp_path / "out.jsonl.failures.jsonl"))
    assert rows(tmp_path / "out.jsonl.failures.jsonl") == []


@pytest.mark.slow
def test_every_record_failing_for_one_reason_exits_non_zero(tmp_path):
    ids = make_input(tmp_path / "in.jsonl", 3)
    with StubServer(plan={i: ["500"] for i in ids}) as stub:
        res = run(gen_cmd(tmp_path, stub.url, "--max_retries", "0"))
        assert res.returncode == 1
        last = res.stderr.strip().splitlines()[-1]
        assert "error: every record failed: gave up after 1 attempts; last error: HTTP 500" in last
        assert "(x3)" in last and "--retry_failed" in last
        assert [r["kind"] for r in rows(tmp_path / "out.jsonl.failures.jsonl")] == ["server"] * 3

        res = run(gen_cmd(tmp_path, stub.url))  # the next run says how to redo them, and asks nothing
        assert res.returncode == 0 and len(stub.requests) == 3
        assert "3 record(s) failed in an earlier run and are skipped; --retry_failed redoes them" in res.stderr
