"""Tests for the synthetic biomedical world (minillavamed/synthetic.py, synthetic_draw.py, synthetic_world.py)."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minillavamed import synthetic as syn
from minillavamed import synthetic_world as sw
from minillavamed.evaluation import closed_correct, open_recall

SMALL = sw.WorldConfig(seed=0, image_size=64, n_pmc=40, n_instruct=30, n_vqa_train=20, n_vqa_test=20, n_general=10)
REPO = Path(__file__).resolve().parents[1]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = sw.generate_world(out, SMALL)
    return paths, {name: sw.load_records(p) for name, p in paths.items() if name != "image_folder"}


def test_same_seed_same_bytes_different_seed_different(world, tmp_path):
    paths, _ = world
    first = _hashes(Path(paths["image_folder"]).parent)
    again = _hashes(Path(sw.generate_world(tmp_path / "again", SMALL)["image_folder"]).parent)
    assert first == again and len(first) == 40 + 20 + 20 + 10 + 8  # images + 7 JSON files + manifest
    other = _hashes(Path(sw.generate_world(tmp_path / "other", sw.WorldConfig(**{**vars(SMALL), "seed": 1}))
                         ["image_folder"]).parent)
    assert other.keys() == first.keys()
    changed = [name for name in first if first[name] != other[name] and name != "manifest.json"]
    assert len(changed) >= 90, "a new seed must change every image and every JSON file"


def test_a_world_drawn_on_two_processes_has_the_same_bytes(world, tmp_path, monkeypatch, capsys):
    paths, _ = world
    monkeypatch.setattr(sw, "PARALLEL_IMAGES", 0)  # the pool even for this small world
    monkeypatch.setattr(sw, "PROGRESS_SECONDS", 0.0)  # and a line of progress after every image
    monkeypatch.setattr(sw.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    two = sw.generate_world(tmp_path / "two", SMALL)
    assert _hashes(Path(two["image_folder"]).parent) == _hashes(Path(paths["image_folder"]).parent)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("synthetic world: drawing 90 images into") and lines[0].endswith("on 2 processes")
    assert re.fullmatch(r"synthetic world: 90/90 images, \d+/s, ETA 0\.0 min", lines[-1])


def test_complete_world_is_reused_and_interrupted_one_regenerated(tmp_path):
    cfg = sw.WorldConfig(image_size=32, n_pmc=5, n_instruct=3, n_vqa_train=5, n_vqa_test=5, n_general=5)
    paths = sw.generate_world(tmp_path, cfg)
    image = Path(paths["image_folder"]) / "pmc_000000.png"
    image.unlink()
    sw.generate_world(tmp_path, cfg)
    assert not image.exists(), "a complete world with the same config must be reused, not rewritten"
    (tmp_path / "manifest.json").unlink()  # what an interrupted generation leaves behind
    sw.generate_world(tmp_path, cfg)
    assert image.exists()
    image.unlink()
    sw.generate_world(tmp_path, sw.WorldConfig(**{**vars(cfg), "seed": 3}))
    assert image.exists(), "a different config must regenerate"


@pytest.mark.parametrize("bad, message", [
    ({"image_size": 16}, "image_size"), ({"n_vqa_test": -1}, "n_vqa_test"),
    ({"n_instruct": 50, "n_pmc": 10}, "n_instruct"),
])
def test_bad_config_is_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        sw.generate_world(tmp_path, sw.WorldConfig(**bad))


def _check_conversation(turns: list[dict], image_first_only: bool) -> None:
    assert len(turns) >= 2 and len(turns) % 2 == 0
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    first = turns[0]["value"]
    assert first.count("<image>") == 1
    if image_first_only:
        assert first.startswith("<image>\n")
    else:
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
    assert all("<image>" not in t["value"] for t in turns[1:])
    assert all(t["value"].strip() == t["value"] and t["value"] == t["value"].lower() for t in turns)


def test_record_formats(world):
    paths, data = world
    folder = Path(paths["image_folder"])
    for r in data["pmc"]:
        assert set(r) == {"pair_id", "image", "fig_label", "fig_caption", "in_text_mention", "domain"}
        assert r["domain"] in syn.DOMAINS and r["fig_label"].startswith("figure ")
        assert isinstance(r["in_text_mention"], list) and all(r["fig_label"] in s for s in r["in_text_mention"])
    for r in data["alignment"]:
        assert set(r) == {"id", "image", "conversations"} and len(r["conversations"]) == 2
        _check_conversation(r["conversations"], image_first_only=False)
    assert [r["conversations"][1]["value"] for r in data["alignment"]] == [r["fig_caption"] for r in data["pmc"]]
    domains = {r["pair_id"]: r["domain"] for r in data["pmc"]}
    for r in data["instruct"]:
        assert set(r) == {"id", "image", "domain", "conversations"}
        assert r["domain"] == {d: d == domains[r["id"]] for d in syn.DOMAINS}
        _check_conversation(r["conversations"], image_first_only=False)
    for r in data["general"]:
        assert set(r) == {"id", "image", "conversations"}
        _check_conversation(r["conversations"], image_first_only=False)
    for split in ("vqa_train", "vqa_test"):
        for r in data[split]:
            assert set(r) == {"id", "image", "conversations", "answer_type", "slice"} and len(r["conversations"]) == 2
            assert r["slice"] in ("seen", "caption-only")
            _check_conversation(r["conversations"], image_first_only=True)
            answer = r["conversations"][1]["value"]
            assert r["answer_type"] in ("CLOSED", "OPEN")
            assert (answer in ("yes", "no")) == (r["answer_type"] == "CLOSED")
            assert 1 <= len(answer.split()) <= 3
    records = [r for name in ("alignment", "instruct", "general", "vqa_train", "vqa_test") for r in data[name]]
    for name in ("alignment", "instruct", "general", "vqa_train", "vqa_test"):
        ids = [r["id"] for r in data[name]]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
    for r in records:
        with Image.open(folder / r["image"]) as im:
            assert im.size == (64, 64) and im.mode in ("L", "RGB")
    # Held-out means held out: no test image is a training image, by name or by content.
    train = {r["image"] for name in ("pmc", "vqa_train", "general") for r in data[name]}
    test = {r["image"] for r in data["vqa_test"]}
    assert not train & test
    digest = lambda name: hashlib.sha256((folder / name).read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(n) for n in train} & {digest(n) for n in test}


def test_domains_and_answers_are_balanced(world):
    _, data = world
    assert [r["domain"] for r in data["pmc"][:10]] == list(syn.DOMAINS) * 2
    rng = np.random.default_rng(0)
    scenes = [syn.sample_scene(syn.DOMAINS[i % 5], rng) for i in range(5000)]
    lesion = [s["lesion"] for s in scenes if "lesion" in s]
    assert abs(lesion.count("yes") / len(lesion) - 0.5) < 0.03
    lobes = [s["lobe"] for s in scenes if "lobe" in s]
    assert max(abs(lobes.count(lobe) / len(lobes) - 0.25) for lobe in syn.LOBES) < 0.04


def test_captions_state_every_fact_of_the_scene():
    rng = np.random.default_rng(1)
    for i in range(500):
        facts = syn.sample_scene(syn.DOMAINS[i % 5], rng)
        label, caption, mentions = syn.write_caption(facts, rng)
        assert syn.parse_caption(caption) == facts, caption
        for question, answer, kind in syn.questions_for(facts, rng):
            if kind == "OPEN":
                assert answer in caption, (question, answer, caption)
    # A caption written by hand, as a person would read it.
    facts = syn.parse_caption("frontal chest x-ray demonstrating a dense opacity in the left lower lobe and "
                              "cardiomegaly with an enlarged heart. image obtained at admission.")
    assert facts == {"modality": "chest x-ray", "opacity": "yes", "lobe": "left lower lobe", "heart_enlarged": "yes"}
    facts = syn.parse_caption("contrast-enhanced ct of the chest showing a small nodular lesion in the right lung.")
    assert facts == {"modality": "ct", "region": "chest", "lesion": "yes", "size": "small", "side": "right",
                     "organ": "lung"}


@pytest.mark.parametrize("caption, missing", [
    ("a photograph of a cat.", "none of the five domains"),
    ("chest x-ray showing no focal opacity.", "heart size"),
    ("h&e-stained histology section showing many cells.", "cell density"),
    ("brain mri showing a large lesion.", "side"),
])
def test_parse_caption_names_what_is_missing(caption, missing):
    with pytest.raises(ValueError, match=missing) as err:
        syn.parse_caption(caption)
    assert caption in str(err.value)


def test_conversations_hold_no_fact_absent_from_the_caption(world):
    _, data = world
    captions = {r["pair_id"]: r["fig_caption"] for r in data["pmc"]}
    table = {q.text: q for q in syn.QUESTIONS}
    checks = {q: d for d, q in syn.MODALITY_CHECKS.items()}
    value_checks = {text.format(v): (topic, v) for topic, (text, values) in syn.VALUE_CHECKS.items() for v in values}
    for r in data["instruct"]:
        caption = captions[r["id"]]
        facts = syn.parse_caption(caption)
        turns = r["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            q, a = syn.normalize_question(human["value"]), gpt["value"]
            if q in table:
                assert a == syn.reasoned_answer(facts, q, table[q].answer(facts)), (q, a, caption)
                if table[q].answer_type == "OPEN":
                    assert table[q].answer(facts) in caption and table[q].answer(facts) in a
            elif q in checks:
                assert a.startswith("yes, " if checks[q] == syn.domain_of(facts) else "no, "), (q, a)
            elif q in value_checks:
                topic, value = value_checks[q]
                assert a.startswith("yes, " if facts[topic] == value else "no, "), (q, a, caption)
            else:
                assert q in syn.DESCRIBE_PROMPTS
                assert syn.parse_caption(a) == facts, (a, caption)
    # The conversation follows the caption's text: edit the caption and the answers change with it.
    caption = "chest x-ray showing an opacity in the right upper lobe and a normal heart size."
    edited = caption.replace("right upper", "left lower")
    answers = [gpt["value"] for seed in range(20)
               for human, gpt in zip(*[iter(syn.conversation_from_caption(edited, np.random.default_rng(seed)))] * 2)
               if syn.normalize_question(human["value"]) == "where is the opacity?"]
    assert answers and set(answers) == {"chest x-ray showing an opacity in the left lower lobe."}


def test_stage_two_replies_answer_with_what_the_figure_shows():
    # GPT-4's replies say, in the caption's words, what the figure shows about the fact asked (after the
    # yes/no of a closed question), and the paper's scoring reads them as their answers: a closed reply's
    # first yes/no word is the answer, an open reply holds every word of the answer. No article comes
    # before a stain, where it would give the stain away before it is written.
    rng = np.random.default_rng(2)
    for i in range(400):
        facts = syn.sample_scene(syn.DOMAINS[i % 5], rng)
        caption = syn.write_caption(facts, rng)[1]
        for question, answer, kind in syn.questions_for(facts, rng):
            reply = syn.reasoned_answer(facts, question, answer)
            assert facts["modality"] in reply and not re.search(r"\ban? \S+-stained", reply), reply
            if kind == "CLOSED":
                assert reply.startswith(f"{answer}, ") and closed_correct(reply, answer), (question, reply)
                assert not closed_correct(reply, "no" if answer == "yes" else "yes")
            else:
                assert open_recall(reply, answer) == 1.0 and answer in caption, (question, reply)
    facts = {"modality": "ct", "region": "abdomen", "lesion": "yes", "size": "small", "side": "left", "organ": "kidney"}
    assert syn.reasoned_answer(facts, "is the lesion large?", "no") == \
        "no, axial ct of the abdomen showing a small lesion in the left kidney."
    assert syn.reasoned_answer(facts, "what type of image is this?", "ct") == "axial ct of the abdomen."
    facts = {"modality": "histology", "stain": "h&e", "density": "low", "atypia": "yes"}
    assert syn.reasoned_answer(facts, "what stain is used?", "h&e") == "h&e-stained histology section."


def test_caption_only_concepts_stay_out_of_the_conversations(world):
    # The paper's proportions: the alignment set shows concepts that no instruction conversation names,
    # and the held-out VQA marks the questions that need one.
    _, data = world
    names = tuple(syn.CAPTION_ONLY.values())
    shown = [r for r in data["pmc"] if any(v in r["fig_caption"] for v in names)]
    assert shown and {r["id"] for r in data["instruct"]}.isdisjoint(r["pair_id"] for r in shown)
    assert not [r["id"] for r in data["instruct"] if any(v in json.dumps(r["conversations"]) for v in names)]
    sliced = [r for r in data["vqa_test"] if r["slice"] == "caption-only"]
    assert 0 < len(sliced) < len(data["vqa_test"]) / 2
    facts = {"modality": "histology", "stain": "trichrome", "density": "low", "atypia": "no"}
    assert syn.vqa_slice(facts, "what stain is used?") == syn.vqa_slice(facts, "is the cell density high?") == "caption-only"
    assert syn.vqa_slice(dict(facts, stain="ihc"), "is the section trichrome-stained?") == "caption-only"
    assert syn.vqa_slice(dict(facts, stain="ihc"), "what stain is used?") == "seen"
    ct = {"modality": "ct", "region": "abdomen", "lesion": "yes", "size": "small", "side": "left", "organ": "kidney"}
    assert syn.vqa_slice(ct, "is there a lesion?") == "caption-only"
    assert syn.vqa_slice({"modality": "ct", "region": "abdomen", "lesion": "no"}, "is there a lesion?") == "seen"


def test_text_legends_are_written_from_the_type_or_from_notes_of_the_findings(world):
    _, data = world
    captions = {f"text_{r['pair_id']}": r["fig_caption"] for r in data["pmc"]}
    with_notes = 0
    for r in data["text"]:
        request, legend = r["conversations"][0]["value"], r["conversations"][1]["value"]
        facts = syn.parse_caption(legend)
        assert legend == captions[r["id"]] and "<image>" not in json.dumps(r)
        head, _, notes = request.partition(" with these findings: ")
        assert head.rstrip(".") == f"write a figure legend for {syn._article(facts['modality'])} {facts['modality']} image"
        if notes:
            with_notes += 1
            assert sorted(notes.rstrip(".").split("; ")) == sorted(syn.finding_notes(facts)), (request, legend)
    assert 0.3 < with_notes / len(data["text"]) < 0.7


def test_conversations_ask_each_fact_once_before_the_description(world):
    # A fact asked twice, or a description before the questions, would let an answer be read off the context.
    _, data = world
    for r in data["instruct"]:
        questions = [syn.normalize_question(h["value"]) for h in r["conversations"][::2]]
        asked = [q for q in questions if q not in syn.DESCRIBE_PROMPTS]
        assert len({syn.TOPIC[q] for q in asked}) == len(asked), questions
        assert questions[: len(asked)] == asked, questions
        assert "presence" not in [syn.TOPIC[q] for q in asked[1:]]


def test_text_only_baseline_on_hand_computed_example():
    def rec(q, a, kind=None):
        r = {"id": q, "image": "x.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                          {"from": "gpt", "value": a}]}
        return r | ({"answer_type": kind} if kind else {})

    train = [rec("is there a lesion?", "yes"), rec("Is there a lesion? ", "yes"), rec("is there a lesion?", "no"),
             rec("where is the opacity?", "left upper lobe"), rec("where is the opacity?", "left upper lobe"),
             rec("where is the opacity?", "right lower lobe")]
    test = [rec("is there a lesion?", "yes", "CLOSED"), rec("is there a lesion?", "no", "CLOSED"),
            rec("is the heart enlarged?", "no", "CLOSED"), rec("where is the opacity?", "right lower lobe", "OPEN")]
    result = sw.text_only_baseline(train, test)
    assert result["closed_accuracy"] == pytest.approx(1 / 3)  # yes right, no wrong, unseen question wrong
    assert result["open_recall"] == pytest.approx(1 / 3)  # "left upper lobe" holds only "lobe"
    assert result["chance_open_recall"] == pytest.approx((1 / 3 + 1) / 2)
    assert (result["n_closed"], result["n_open"]) == (3, 1)


@pytest.mark.slow
def test_text_only_baseline_stays_near_chance(tmp_path):
    cfg = sw.WorldConfig(seed=7, image_size=32, n_pmc=200, n_instruct=150, n_vqa_train=150, n_vqa_test=150,
                          n_general=0)
    result = sw.world_baseline(sw.generate_world(tmp_path, cfg))
    print("text-only baseline:", result)
    assert result["n_closed"] > 300 and result["n_open"] > 200
    assert abs(result["closed_accuracy"] - 0.5) <= 0.10
    assert result["open_recall"] <= result["chance_open_recall"] + 0.10


@pytest.mark.slow
def test_cli_writes_world_and_grid(tmp_path):
    grid = tmp_path / "grid.png"
    out = subprocess.run([sys.executable, "-m", "minillavamed.synthetic_world", "--out", str(tmp_path / "w"),
                          "--grid", str(grid),
                          "--image_size", "48", "--n_pmc", "5", "--n_instruct", "3", "--n_vqa_train", "5",
                          "--n_vqa_test", "5", "--n_general", "5"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "text-only baseline" in out.stdout
    with Image.open(grid) as im:
        assert im.size == (6 * 48, 6 * 48)
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["config"]["image_size"] == 48
