"""The curriculum table of the README, regenerated from scratch: every row trained and scored by this script.

The paper's findings (§4, Tables 2-3) on the synthetic world: concept alignment (stage 1) teaches what the
instruction conversations never name, stage 1 alone cannot follow instructions, and a sixth of the
instruction data scores lower. For each seed it runs train.py (stages 0-2, stage 2 without stage 1, stage 2
on a sixth of the conversations), then scores every row's answers.jsonl on the held-out VQA, overall and per
slice (`synthetic.vqa_slice`: whether the question's concept is in the instruction data), and per fact. It
also captions held-out images with the stage-1 model (in the template it trained with) and reads the facts
back with the caption parser, which shows what concept alignment learnt even where VQA cannot.

A finished row (its answers.jsonl present) is not trained again, so a killed run continues where it was.
Seed 1337, train.py's default, writes the README's directories (out/tiny/stageN), so the quickstart's
commands are this table's first rows.

    python bench/curriculum.py --seeds 1337 1338
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minillavamed import synthetic as syn  # noqa: E402
from minillavamed import synthetic_world as world  # noqa: E402
from minillavamed.data import load_records  # noqa: E402
from minillavamed.evaluation import closed_correct, open_recall  # noqa: E402
from train import TrainConfig  # noqa: E402

WORLD = ROOT / "data" / "synthetic"
DEFAULT_SEED = 1337
# The share of the instruction data in the data-scale row: the paper's 10K against its 60K.
SMALL_SHARE = 6


def run_dir(seed: int, name: str) -> Path:
    base = ROOT / "out" / "tiny"
    return base / name if seed == DEFAULT_SEED else base / f"seed{seed}" / name


def rows(seed: int, train_records: int) -> list[tuple[str, str, list[str]]]:
    """(key, label, train.py arguments) in the order they must run."""
    d = lambda name: str(run_dir(seed, name))  # noqa: E731
    return [
        ("stage0", "after stage 0 (general base, stands in for LLaVA)", ["--stage", "0", "--out_dir", d("stage0")]),
        ("stage1", "after stage 1 (concept alignment)", ["--stage", "1", "--out_dir", d("stage1"),
                                                         "--init_from", d("stage0")]),
        ("stage2", "after stage 2 (instruction tuning)", ["--stage", "2", "--out_dir", d("stage2"),
                                                          "--init_from", d("stage1")]),
        ("no_align", "stage 2 without stage 1 (the paper's ablation)",
         ["--stage", "2", "--init_from", d("stage0"), "--out_dir", d("stage2-no-align")]),
        ("small", f"stage 2 on a sixth of the conversations ({train_records}, the paper's 10K of 60K)",
         ["--stage", "2", "--init_from", d("stage1"), "--out_dir", d("stage2-sixth"),
          "--train_records", str(train_records)]),
    ]


def command_text(args: list[str]) -> str:
    """The README form of a seed-1337 row's command: directories left out where train.py fills them in."""
    stage, out = args[1], args[args.index("--out_dir") + 1]
    rest = [a for a in args[2:] if a not in ("--out_dir", out)]
    previous = str(run_dir(DEFAULT_SEED, f"stage{int(stage) - 1}"))
    if "--init_from" in rest and rest[rest.index("--init_from") + 1] == previous:
        k = rest.index("--init_from")
        rest = rest[:k] + rest[k + 2:]
    default_out = out == str(run_dir(DEFAULT_SEED, f"stage{stage}"))
    rel = lambda a: str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a  # noqa: E731
    return " ".join(["python train.py --stage", stage, *map(rel, rest), *([] if default_out else ["--out_dir", rel(out)])])


def train(args: list[str], seed: int, log) -> float:
    out = Path(args[args.index("--out_dir") + 1])
    if (out / "answers.jsonl").exists():
        log(f"  {out.relative_to(ROOT)}: done before, kept")
        return json.loads((out / "wall.json").read_text())["seconds"] if (out / "wall.json").exists() else math.nan
    cmd = [sys.executable, str(ROOT / "train.py"), *args] + (["--seed", str(seed)] if seed != DEFAULT_SEED else [])
    # A row cut short leaves no answers.jsonl: it continues from its last checkpoint, or starts over.
    if out.exists():
        cmd += ["--resume"] if list((out / "checkpoints").glob("step-*")) else ["--move_aside"]
    log(f"  $ {' '.join(cmd[1:])}")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (out / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def test_facts() -> list[dict]:
    """The hidden scene of every held-out VQA image."""
    cfg = world.WorldConfig(**json.loads((WORLD / "manifest.json").read_text())["config"])
    return [world.scene(cfg, "vqa_test", i)[1] for i in range(cfg.n_vqa_test)]


def score(answers_file: Path, test: list[dict]) -> dict[str, dict[str, float]]:
    """{group: {"closed": %, "open": %, "n_closed", "n_open"}} for overall, each slice and each (domain, fact)."""
    answers = {r["id"]: r["answer"] for r in map(json.loads, answers_file.read_text().splitlines())}
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in test:
        gt, pred = r["conversations"][1]["value"], answers.get(r["id"], "")
        kind = "closed" if r["answer_type"] == "CLOSED" else "open"
        value = closed_correct(pred, gt) if kind == "closed" else open_recall(pred, gt)
        image = int(r["id"].split("_")[2])
        topic = syn.TOPIC[syn.normalize_question(r["conversations"][0]["value"])]
        for g in ("overall", r["slice"], f"{syn.DOMAINS[image % len(syn.DOMAINS)]}: {topic}"):
            groups[g][kind].append(100.0 * value)
    return {g: {k: statistics.mean(v[k]) if v[k] else math.nan for k in ("closed", "open")}
            | {f"n_{k}": len(v[k]) for k in ("closed", "open")} for g, v in groups.items()}


def caption_facts(model_dir: Path, facts: list[dict], n: int) -> dict[str, float]:
    """Share of the facts that stage 1's own captions of n held-out images state correctly, per fact, and
    the share of captions the parser could read at all."""
    from minillavamed.data import load_image
    from minillavamed.inference import Assistant

    # In the template the stage trained with: `plain` drops the instruction, a chat template keeps it.
    assistant = Assistant.load(model_dir, conv=json.loads((model_dir / "train_config.json").read_text())["conv"])
    right: dict[str, list[float]] = defaultdict(list)
    readable = []
    for start in range(0, n, 32):
        idx = range(start, min(n, start + 32))
        images = [load_image(WORLD / "images" / f"vqa_test_{i:06d}.png") for i in idx]
        prompts = [syn.ALIGNMENT_PROMPTS[0]] * len(images)
        for i, caption in zip(idx, assistant.answer(prompts, images, max_new_tokens=48)):
            try:
                got = syn.parse_caption(caption)
            except ValueError:
                got = {}
            readable.append(float(bool(got)))
            for key, value in facts[i].items():
                right[key].append(100.0 * (got.get(key) == value))
    return {"readable": 100.0 * statistics.mean(readable)} | {k: statistics.mean(v) for k, v in right.items()}


def spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED], help="training seeds, one table row each")
    p.add_argument("--captions", type=int, default=200, help="held-out images the stage-1 model captions")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "tiny" / "curriculum.json",
                   help="every number of the table, as JSON")
    args = p.parse_args()
    log = lambda text: print(text, flush=True)  # noqa: E731

    paths = world.generate_world(WORLD)
    test = load_records(paths["vqa_test"])
    facts = test_facts()
    baseline = world.world_baseline(paths)
    small = (len(load_records(paths["instruct"])) - TrainConfig().val_size) // SMALL_SHARE
    commands = {key: command_text(targs) for key, _, targs in rows(DEFAULT_SEED, small)}
    results: dict[str, dict] = {}
    for seed in args.seeds:
        log(f"seed {seed}")
        for key, label, targs in rows(seed, small):
            seconds = train(targs, seed, log)
            out = Path(targs[targs.index("--out_dir") + 1])
            entry = results.setdefault(key, {"label": label, "command": commands[key], "seeds": {}})
            entry["seeds"][seed] = {"minutes": seconds / 60, "scores": score(out / "answers.jsonl", test)}
            log(f"  {key}: {json.dumps(entry['seeds'][seed]['scores']['overall'])}")
        stage1 = run_dir(seed, "stage1")
        results["stage1"]["seeds"][seed]["captions"] = caption_facts(stage1, facts, args.captions)
        answers = [json.loads(line) for line in (stage1 / "answers.jsonl").read_text().splitlines()[:6]]
        results["stage1"]["seeds"][seed]["examples"] = answers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": baseline, "rows": results}, indent=1))

    def cell(key: str, group: str, kind: str) -> str:
        return spread([s["scores"].get(group, {}).get(kind, math.nan) for s in results[key]["seeds"].values()])

    n = score(run_dir(args.seeds[0], "stage2") / "answers.jsonl", test)
    print(f"\nheld-out VQA: {n['overall']['n_closed']} closed / {n['overall']['n_open']} open questions; "
          f"caption-only slice {n['caption-only']['n_closed']} / {n['caption-only']['n_open']}; "
          f"seeds {', '.join(map(str, args.seeds))} (mean, and min-max over seeds)\n")
    print("| model | command | minutes | closed | open | caption-only closed | caption-only open |")
    print("|---|---|---|---|---|---|---|")
    print(f"| text-only baseline (best question→answer lookup, no image) | `python -m minillavamed.synthetic_world "
          f"--out data/synthetic` | | {100 * baseline['closed_accuracy']:.1f} | {100 * baseline['open_recall']:.1f} "
          f"| | |")
    for key, entry in results.items():
        minutes = spread([s["minutes"] for s in entry["seeds"].values()])
        print(f"| {entry['label']} | `{entry['command']}` | {minutes} | {cell(key, 'overall', 'closed')} | "
              f"{cell(key, 'overall', 'open')} | {cell(key, 'caption-only', 'closed')} | "
              f"{cell(key, 'caption-only', 'open')} |")
    print("\nper fact after stage 2 and without stage 1 (closed / open):\n")
    print("| fact | after stage 2 | without stage 1 |")
    print("|---|---|---|")
    for group in sorted(g for g in n if ": " in g):
        pair = [f"{cell(k, group, 'closed')} / {cell(k, group, 'open')}" for k in ("stage2", "no_align")]
        print(f"| {group} | {pair[0]} | {pair[1]} |")
    print(f"\nstage 1's own captions of {args.captions} held-out images, facts read back correctly (%):\n")
    caps = [s["captions"] for s in results["stage1"]["seeds"].values()]
    print(" ".join(f"{k} {spread([c.get(k, math.nan) for c in caps])};" for k in caps[0]))
    print("\nstage 1 asked VQA questions in the chat template (it cannot follow instructions):\n")
    for a in next(iter(results["stage1"]["seeds"].values()))["examples"]:
        print(f"- {a['question']!r} (answer {a['gt']!r}) -> {a['answer']!r}")


if __name__ == "__main__":
    main()
