"""Data synthesis for the curriculum (paper §3): figure captions -> LLaVA conversation records.

--mode instruct   (stage 2, instruction tuning) a language-only model writes a conversation about each figure
                  from its caption (and citing sentences with --inline_mentions), through any OpenAI-compatible
                  endpoint; resumable, every input id ends exactly once in OUT or in the failures file.
--mode alignment  (stage 1, concept alignment) each caption paired with a sampled "describe the figure"
                  instruction; no API calls.

python generate_data.py --input IN --output OUT --base_url URL --model NAME [--concurrency N]
    [--max_retries R] [--timeout S] [--failures FILE]
A re-run skips what is done and retries records that failed because no server answered (nothing was paid for);
other failures are redone with --retry_failed. A run in which every record failed exits 1 with the reason.
The API key comes from OPENAI_API_KEY (Azure: AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, OPENAI_API_VERSION
with no --base_url); it never appears in logs, outputs or error messages.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter

from minillavamed import api, instruct
from minillavamed.records import JsonlAppender, located_records, read_jsonl_resume


def load_records(path: str) -> list[dict]:
    """PMC-15M style records from a JSON array, LLaVA-Med's {domain: [records]} or JSONL; errors name the file
    and the record."""
    try:
        located = located_records(path, grouped=instruct.pmc_records)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    seen, out = set(), []
    for where, rec in zip([w for w, _ in located], instruct.pmc_records([r for _, r in located])):
        for key in ("pair_id", "image", "fig_caption"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise SystemExit(f"{where}: missing or empty '{key}'")
        if rec["pair_id"] in seen:
            raise SystemExit(f"{where}: duplicate pair_id {rec['pair_id']!r}")
        seen.add(rec["pair_id"])
        out.append(rec)
    return out


def prepare_failures(path: str, retry_failed: bool, input_ids: set[str], retry_unanswered: bool = True) -> set[str]:
    """Ids already failed. Failures no server answered (kind "connection") are taken out of the file
    (atomically) to be redone, and with --retry_failed every failure of the input is."""
    rows = read_jsonl_resume(path)
    redo = [r for r in rows if r["id"] in input_ids and (retry_failed or retry_unanswered and r.get("kind") == "connection")]
    if not redo:
        return {r["id"] for r in rows}
    if not retry_failed:
        print(f"[generate] retrying {len(redo)} record(s) that failed because no server answered",
              file=sys.stderr)
    keep = [r for r in rows if r not in redo]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {r["id"] for r in keep}


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One status line: done/total, rate, ETA, tokens and cost so far."""

    def __init__(self, total: int, already: int, args):
        self.total, self.already, self.args = total, already, args
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def line(self, client) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.done + self.failed) / elapsed
        left = self.total - self.already - self.done - self.failed
        eta = fmt_duration(left / rate) if rate > 0 else "?"
        tok_in, tok_out = (client.prompt_tokens, client.completion_tokens) if client else (0, 0)
        cost = (tok_in * self.args.price_in + tok_out * self.args.price_out) / 1e6
        return (f"[generate] {self.already + self.done + self.failed}/{self.total} "
                f"({self.failed} failed) | {rate:.2f} rec/s | ETA {eta} | "
                f"tokens {tok_in:,} in / {tok_out:,} out | ${cost:.2f}")

    def tick(self, client, force: bool = False) -> None:
        if force or time.monotonic() - self.last >= self.args.progress_seconds:
            self.last = time.monotonic()
            print(self.line(client), file=sys.stderr, flush=True)


def dry_run(pending: list[dict], args) -> None:
    """Print the exact messages of the first request and estimate tokens and cost; no network."""
    if not pending:
        print("nothing to do: every record is already in the output or the failures file")
        return
    print(json.dumps(instruct.build_messages(pending[0], args.inline_mentions), indent=2, ensure_ascii=False))
    # Rough estimate: ~4 characters per token for English text; a reply about as long as a few-shot answer.
    prompt_chars = sum(sum(len(m["content"]) for m in instruct.build_messages(r, args.inline_mentions))
                       for r in pending)
    reply_chars = sum(len(f"User: {q}\nAssistant: {a}\n\n") for ex in instruct.FEW_SHOT_EXAMPLES
                      for q, a in ex["conversation"]) / len(instruct.FEW_SHOT_EXAMPLES)
    tok_in, tok_out = prompt_chars / 4, len(pending) * reply_chars / 4
    cost = (tok_in * args.price_in + tok_out * args.price_out) / 1e6
    print(f"\n[dry run] {len(pending)} requests; estimated tokens (chars/4): {tok_in:,.0f} in, {tok_out:,.0f} out "
          f"(at most {len(pending) * args.max_tokens:,} out); estimated cost ${cost:,.2f} at "
          f"${args.price_in}/${args.price_out} per 1M tokens in/out")


class Unreachable(api.FatalAPIError):
    """The first records all failed to connect and none succeeded: the endpoint is down or wrong."""


async def run_instruct(pending: list[dict], args, out, failures, progress) -> int:
    cfg = api.ClientConfig(model=args.model, base_url=args.base_url, temperature=args.temperature,
                                max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
                                backoff_base=args.backoff_base)
    client = api.ChatClient(cfg)
    queue: asyncio.Queue = asyncio.Queue()
    for rec in pending:
        queue.put_nowait(rec)
    reasons: Counter = Counter()
    unreachable_after = min(len(pending), max(4, args.concurrency))  # failed connections before giving up

    async def worker():
        while not queue.empty():
            rec = queue.get_nowait()
            try:
                reply = await client.complete(instruct.build_messages(rec, args.inline_mentions))
                row = instruct.to_llava_record(rec, reply, instruct.record_rng(args.seed, rec["pair_id"]))
            except (api.APIFailure, instruct.ReplyError) as e:
                # Single-threaded event loop: writes from different workers never interleave.
                reason, kind = api.redact(str(e)), getattr(e, "kind", "reply")
                failures.write({"id": rec["pair_id"], "reason": reason, "kind": kind, "time": time.time()})
                progress.failed += 1
                reasons[reason] += 1
                if kind == "connection" and progress.done == 0 and reasons[reason] >= unreachable_after:
                    raise Unreachable(f"no server answered at {args.base_url or 'the default endpoint'} for the "
                                      f"first {reasons[reason]} records ({reason}); check --base_url and that "
                                      "the server is running, then re-run: these records are retried")
            else:
                out.write(row)
                progress.done += 1
            progress.tick(client)

    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    fatal = None
    try:
        await asyncio.gather(*workers)
    except api.FatalAPIError as e:
        fatal = e
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        progress.tick(client, force=True)
        await client.close()
    if fatal is not None:  # after the progress line, so that the reason is the last line
        print(f"error: {api.redact(str(fatal))}; stopping (re-run to resume)", file=sys.stderr)
        return 2
    if progress.failed and not progress.done:
        top = "; ".join(f"{r} (x{n})" for r, n in reasons.most_common(2))
        print(f"error: every record failed: {top}; see {args.failures_path}, fix the cause, then re-run with "
              "--retry_failed", file=sys.stderr)
        return 1
    if progress.failed:
        print(f"[generate] {progress.failed} record(s) failed, reasons in {args.failures_path}; "
              "--retry_failed redoes them", file=sys.stderr)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="figure-caption records, JSON array or JSONL")
    p.add_argument("--output", required=True, help="JSONL of LLaVA conversation records (appended to)")
    p.add_argument("--mode", choices=["instruct", "alignment"], default="instruct")
    p.add_argument("--failures", help="JSONL of failed ids with reasons (default: OUTPUT.failures.jsonl)")
    p.add_argument("--base_url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model (Azure: deployment) name; required in instruct mode")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max_tokens", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--max_retries", type=int, default=5, help="retries per record after the first attempt")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--backoff_base", type=float, default=1.0, help="seconds; retry k waits ~base*2^k")
    p.add_argument("--inline_mentions", action="store_true", help="add the sentences citing the figure")
    p.add_argument("--limit", type=int, help="only the first N input records")
    p.add_argument("--dry_run", action="store_true", help="print the messages and a cost estimate; no network")
    p.add_argument("--retry_failed", action="store_true", help="redo the ids in the failures file")
    p.add_argument("--seed", type=int, default=0, help="seeds instruction sampling and <image> placement")
    p.add_argument("--price_in", type=float, default=30.0, help="USD per 1M prompt tokens (GPT-4 8K list price)")
    p.add_argument("--price_out", type=float, default=60.0, help="USD per 1M completion tokens")
    p.add_argument("--progress_seconds", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args()
    if args.mode == "instruct" and not args.model and not args.dry_run:
        p.error("--model is required in instruct mode")
    if args.concurrency < 1 or args.max_retries < 0:
        p.error("--concurrency must be >= 1 and --max_retries >= 0")
    failures_path = args.failures_path = args.failures or args.output + ".failures.jsonl"

    records = load_records(args.input)[:args.limit]
    input_ids = {r["pair_id"] for r in records}
    done = {r["id"] for r in read_jsonl_resume(args.output)}
    failed = prepare_failures(failures_path, args.retry_failed and not args.dry_run, input_ids,
                              retry_unanswered=not args.dry_run)
    if done & failed:
        raise SystemExit(f"ids in both {args.output} and {failures_path}: {sorted(done & failed)[:5]}")
    pending = [r for r in records if r["pair_id"] not in done and r["pair_id"] not in failed]
    already = len(records) - len(pending)
    if failed & input_ids and not args.retry_failed:
        print(f"[generate] {len(failed & input_ids)} record(s) failed in an earlier run and are skipped; "
              f"--retry_failed redoes them (reasons in {failures_path})", file=sys.stderr)
    if args.dry_run:
        if args.mode == "alignment":
            print(f"[dry run] alignment mode makes no API calls; {len(pending)} records to write")
        else:
            dry_run(pending, args)
        return 0

    out, failures = JsonlAppender(args.output), JsonlAppender(failures_path)
    progress = Progress(len(records), already, args)
    try:
        if args.mode == "alignment":
            for rec in pending:
                out.write(instruct.alignment_record(rec, instruct.record_rng(args.seed, rec["pair_id"])))
                progress.done += 1
            progress.tick(None, force=True)
            return 0
        return asyncio.run(run_instruct(pending, args, out, failures, progress))
    except api.FatalAPIError as e:
        print(f"error: {api.redact(str(e))}", file=sys.stderr)
        return 2
    finally:
        out.close()
        failures.close()


if __name__ == "__main__":
    sys.exit(main())
