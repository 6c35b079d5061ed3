"""The synthetic biomedical world: LLaVA-Med's data pipeline (paper §3) on data that needs no download.

Every image is drawn from a hidden scene (synthetic_draw.py) in one of the paper's five domains. From the
scene we write only a PMC-style figure caption with inline mentions; everything after that mirrors the
paper and reads the caption text, never the scene:
  (a) figure-caption pairs (the input of generate_data.py) and stage-1 concept-alignment records
      (`llava_med_alignment_500k.json` style: a sampled "describe the figure" instruction -> caption);
  (b) stage-2 instruction-tuning conversations, written by rules standing in for GPT-4 that parse the
      facts back out of the caption (`llava_med_instruct_60k.json` style), a tenth as many as (a), as in
      the paper, and only from captions that show no CAPTION_ONLY concept; each reply first says what the
      figure shows, in the caption's words, then answers (`reasoned_answer`);
  (c) VQA train / held-out test sets on new images (VQA-RAD style closed yes/no and short open answers),
      each question marked "seen" or "caption-only" (`vqa_slice`);
  (d) a general-domain set (shapes, colours, positions) for the from-scratch base model that stands in
      for LLaVA in the tiny curriculum.
Question phrasings and answer words are the same in captions, conversations and VQA, so that a stage-2
reply holds the VQA answer; closed answers are balanced per question and open answers uniform, so a
model that ignores the image stays near chance (synthetic_world.text_only_baseline measures it).
This file writes the records; synthetic_world.py draws the images and writes the world to disk.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from minillavamed.synthetic_draw import BACKGROUNDS
from minillavamed.conversation import place_image

DOMAINS = ("chest_xray", "ct_scan", "mri", "histology", "gross")
# The open answer to "what type of image is this?"; each also appears verbatim in that domain's captions.
MODALITY = {"chest_xray": "chest x-ray", "ct_scan": "ct", "mri": "mri", "histology": "histology",
            "gross": "gross pathology"}
LOBES = ("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe")
STAINS = ("h&e", "ihc", "trichrome")
GROSS_COLOURS = ("white", "red", "yellow")
ORGANS = ("lung", "kidney")
# Concepts that only the figure captions show: no instruction conversation is written from a caption that
# names one, or names one itself. The paper's alignment set (~500K pairs) covers far more than its
# instruction set (60K), and the held-out VQA is split by this (`vqa_slice`): on the "caption-only" slice
# an answer needs what concept alignment alone taught.
CAPTION_ONLY = {"stain": "trichrome", "color": "yellow", "organ": "kidney"}


def choose(rng: np.random.Generator, options):
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _yes_no(rng: np.random.Generator) -> str:
    return "yes" if rng.random() < 0.5 else "no"


def sample_scene(domain: str, rng: np.random.Generator) -> dict:
    """The hidden scene: every fact a caption states and a VQA question asks, each uniform over its values."""
    facts = {"modality": MODALITY[domain]}
    if domain == "chest_xray":
        facts["opacity"] = _yes_no(rng)
        if facts["opacity"] == "yes":
            facts["lobe"] = choose(rng, LOBES)
        facts["heart_enlarged"] = _yes_no(rng)
    elif domain == "histology":
        facts.update(stain=choose(rng, STAINS), density=choose(rng, ("high", "low")), atypia=_yes_no(rng))
    else:
        if domain == "ct_scan":
            facts["region"] = choose(rng, ("chest", "abdomen"))
        facts["lesion"] = _yes_no(rng)
        if facts["lesion"] == "yes":
            facts["size"] = choose(rng, ("small", "large"))
            if domain == "gross":
                facts["color"] = choose(rng, GROSS_COLOURS)
            else:
                facts["side"] = choose(rng, ("left", "right"))
            if domain == "ct_scan":
                facts["organ"] = "lung" if facts["region"] == "chest" else "kidney"
    return facts


def domain_of(facts: dict) -> str:
    return {name: d for d, name in MODALITY.items()}[facts["modality"]]


# ---------------------------------------------------------------------------------------------------------
# (a) Captions. `pick` chooses among paraphrases: random for captions, a fixed one for the replies of the
# conversations (`_reply_pick`), so both are parsed by the same rules.

Pick = Callable[[list[str]], str]


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeio" or phrase.startswith(("h&e", "mri")) else "a"


def finding_clauses(facts: dict, pick: Pick) -> tuple[str, str, str, dict[str, str]]:
    """(subject, verb, findings, {fact: clause}) of the sentence that names the modality and every finding of
    the scene, in the world's fixed vocabulary; the subject names the modality (and the stain), `findings`
    joins the clauses as the sentence says them."""
    domain = domain_of(facts)
    verb = pick(["showing", "demonstrating", "revealing"])
    if domain == "chest_xray":
        subject = pick(["chest x-ray", "frontal chest x-ray", "posteroanterior chest x-ray"])
        if facts["opacity"] == "yes":
            opacity = pick(["an opacity", "a focal opacity", "a dense opacity"]) + f" in the {facts['lobe']}"
        else:
            opacity = pick(["no focal opacity", "clear lungs with no opacity"])
        heart = (pick(["an enlarged heart", "cardiomegaly with an enlarged heart"]) if facts["heart_enlarged"] == "yes"
                 else pick(["a normal heart size", "a heart of normal size"]))
        return subject, verb, f"{opacity} and {heart}", {"presence": opacity, "lobe": opacity, "heart": heart}
    if domain == "histology":
        stain = facts["stain"]
        subject = pick([f"histology of {_article(stain)} {stain}-stained section",
                        f"{stain}-stained histology section",
                        f"histology image of {_article(stain)} {stain}-stained tissue"])
        atypia = (pick(["atypical nuclei", "large atypical nuclei"]) if facts["atypia"] == "yes"
                  else pick(["no atypical nuclei", "no nuclear atypia"]))
        density = f"{facts['density']} cell density"
        return subject, verb, f"{density} with {atypia}", {"density": density, "atypia": atypia}
    if domain == "gross":
        subject = pick(["gross pathology photograph of the resected specimen",
                        "gross pathology of the excised specimen"])
        if facts["lesion"] == "yes":
            lesion = f"a {facts['size']} {facts['color']} lesion" + pick(["", " on the cut surface"])
        else:
            lesion = pick(["no lesion", "no focal lesion on the cut surface"])
        return subject, verb, lesion, dict.fromkeys(("presence", "size", "color"), lesion)
    if domain == "ct_scan":
        subject = pick(["axial ct", "contrast-enhanced ct", "ct scan"]) + f" of the {facts['region']}"
        place, adjective = facts.get("organ", ""), "nodular" if facts["region"] == "chest" else "hypodense"
    else:
        subject = pick(["axial t2-weighted mri of the brain", "brain mri", "mri of the brain"])
        place, adjective = "hemisphere", "hyperintense"
    if facts["lesion"] == "yes":
        lesion = (f"a {facts['size']} " + pick(["", adjective + " "]) + f"lesion in the {facts['side']} {place}")
    else:
        lesion = pick(["no lesion", "no focal lesion"])
    return subject, verb, lesion, dict.fromkeys(("presence", "size", "side", "organ"), lesion)


def finding_sentence(facts: dict, pick: Pick) -> str:
    """One sentence naming the modality and every finding of the scene, in the world's fixed vocabulary."""
    subject, verb, findings, _ = finding_clauses(facts, pick)
    return f"{subject} {verb} {findings}."


CONTEXT_SENTENCES = ["image obtained at admission.", "follow-up study after treatment.",
                     "representative case from the series.", "findings were confirmed on review."]


def write_caption(facts: dict, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """A PMC-style figure: (fig_label, fig_caption, in_text_mention sentences)."""
    pick = lambda options: choose(rng, options)  # noqa: E731
    label = f"figure {int(rng.integers(1, 7))}"
    caption = finding_sentence(facts, pick)
    if rng.random() < 0.5:
        caption += " " + pick(CONTEXT_SENTENCES)
    # The paper's "inline mention" variant adds the sentences of the article that cite the figure.
    mentions = [f"as shown in {label}, the {MODALITY[domain_of(facts)]} findings are described in the text.",
                f"the {finding_sentence(facts, pick)[:-1]} is shown in {label}."]
    return label, caption, mentions[: 1 + int(rng.integers(2))]


def parse_caption(text: str) -> dict:
    """Read the facts back from caption text: what the rules standing in for GPT-4 know about an image."""
    t = text.lower()
    for domain, cue in (("chest_xray", r"chest x-ray"), ("gross", r"gross pathology"), ("histology", r"histology"),
                        ("mri", r"\bmri\b"), ("ct_scan", r"\bct\b")):
        if re.search(cue, t):
            break
    else:
        raise ValueError(f"caption names none of the five domains: {text!r}")
    facts = {"modality": MODALITY[domain]}

    def need(pattern: str, what: str) -> re.Match:
        m = re.search(pattern, t)
        if m is None:
            raise ValueError(f"{domain} caption does not state {what}: {text!r}")
        return m

    if domain == "chest_xray":
        m = re.search(r"opacity in the ((?:left|right) (?:upper|lower) lobe)", t)
        facts["opacity"] = "yes" if m else "no"
        if m:
            facts["lobe"] = m.group(1)
        else:
            need(r"no (?:focal )?opacity", "whether there is an opacity")
        facts["heart_enlarged"] = "yes" if need(r"enlarged heart|normal heart size|heart of normal size",
                                                "the heart size").group(0) == "enlarged heart" else "no"
    elif domain == "histology":
        facts["stain"] = need(r"(h&e|ihc|trichrome)-stained", "the stain").group(1)
        facts["density"] = need(r"(high|low) cell density", "the cell density").group(1)
        facts["atypia"] = "no" if need(r"(no atypical nuclei|no nuclear atypia|atypical nuclei)",
                                       "nuclear atypia").group(1).startswith("no") else "yes"
    else:
        if domain == "ct_scan":
            facts["region"] = need(r"of the (chest|abdomen)", "the body region").group(1)
        m = re.search(r"(small|large) (?:(white|red|yellow) |nodular |hypodense |hyperintense )?lesion"
                      r"(?: in the (left|right) (lung|kidney|hemisphere))?", t)
        facts["lesion"] = "yes" if m else "no"
        if m is None:
            need(r"no (?:focal )?lesion", "whether there is a lesion")
        elif domain == "gross":
            facts.update(size=m.group(1), color=need(r"(white|red|yellow) lesion", "the lesion colour").group(1))
        else:
            if m.group(3) is None:
                raise ValueError(f"{domain} caption does not state the lesion's side: {text!r}")
            facts.update(size=m.group(1), side=m.group(3))
            if domain == "ct_scan":
                facts["organ"] = m.group(4)
    return facts


# ---------------------------------------------------------------------------------------------------------
# (b, c) Questions. One phrasing per question, shared by stage-2 conversations and VQA.

@dataclass(frozen=True)
class Question:
    text: str
    answer_type: str  # "CLOSED" (yes/no) or "OPEN" (short phrase)
    answer: Callable[[dict], str | None]  # None: the question does not apply to this scene
    topic: str  # the fact it asks about; one conversation asks about each fact at most once


def _when(key: str, value: str) -> Callable[[dict], str | None]:
    return lambda f: None if key not in f else ("yes" if f[key] == value else "no")


QUESTIONS = [
    Question("what type of image is this?", "OPEN", lambda f: f["modality"], "modality"),
    Question("is there an opacity?", "CLOSED", lambda f: f.get("opacity"), "presence"),
    Question("where is the opacity?", "OPEN", lambda f: f.get("lobe"), "lobe"),
    Question("is the heart enlarged?", "CLOSED", lambda f: f.get("heart_enlarged"), "heart"),
    Question("is there a lesion?", "CLOSED", lambda f: f.get("lesion"), "presence"),
    Question("what is the size of the lesion?", "OPEN", lambda f: f.get("size"), "size"),
    Question("is the lesion large?", "CLOSED", _when("size", "large"), "size"),
    Question("which side is the lesion on?", "OPEN", lambda f: f.get("side"), "side"),
    Question("is the lesion on the left side?", "CLOSED", _when("side", "left"), "side"),
    Question("which organ is the lesion in?", "OPEN", lambda f: f.get("organ"), "organ"),
    Question("what color is the lesion?", "OPEN", lambda f: f.get("color"), "color"),
    Question("what stain is used?", "OPEN", lambda f: f.get("stain"), "stain"),
    Question("what is the cell density?", "OPEN", lambda f: f.get("density"), "density"),
    Question("is the cell density high?", "CLOSED", _when("density", "high"), "density"),
    Question("are there atypical nuclei?", "CLOSED", lambda f: f.get("atypia"), "atypia"),
]
# Yes/no checks of one value of a fact, asked of the true value half the time (like the modality checks).
VALUE_CHECKS = {"stain": ("is the section {}-stained?", STAINS), "color": ("is the lesion {}?", GROSS_COLOURS),
                "organ": ("is the lesion in the {}?", ORGANS)}
MODALITY_CHECKS = {"chest_xray": "is this a chest x-ray?", "ct_scan": "is this a ct scan?", "mri": "is this an mri?",
                   "histology": "is this a histology image?", "gross": "is this a gross pathology image?"}
TOPIC = ({q.text: q.topic for q in QUESTIONS} | {q: "modality" for q in MODALITY_CHECKS.values()}
         | {text.format(v): topic for topic, (text, values) in VALUE_CHECKS.items() for v in values})
DESCRIBE_PROMPTS = ["describe the image.", "what are the findings in this image?", "can you describe this figure?"]
# Stage-1 instructions, in the manner of LLaVA's brief-description list (our wording).
ALIGNMENT_PROMPTS = ["describe the figure concisely.", "provide a brief description of the given figure.",
                     "summarize the visual content of the figure.", "write a caption for this figure.",
                     "give a short explanation of the figure.", "what is shown in this figure?"]


def normalize_question(text: str) -> str:
    return " ".join(text.replace("<image>", " ").lower().split())


def questions_for(facts: dict, rng: np.random.Generator, unnamed: frozenset[str] = frozenset()
                  ) -> list[tuple[str, str, str]]:
    """All (question, answer, answer_type) that apply, plus a modality check and a check of each valued fact
    (stain, colour, organ) that are true half the time; no check names a value in `unnamed`, and a check
    with no other value left to ask is left out."""
    qa = [(q.text, a, q.answer_type) for q in QUESTIONS if (a := q.answer(facts)) is not None]
    domain = domain_of(facts)
    # True half the time and otherwise uniform over the other values, so each check string is itself 50/50.
    asked = domain if rng.random() < 0.5 else choose(rng, [d for d in DOMAINS if d != domain])
    qa.append((MODALITY_CHECKS[asked], "yes" if asked == domain else "no", "CLOSED"))
    for topic, (text, values) in VALUE_CHECKS.items():
        others = [v for v in values if v != facts.get(topic) and v not in unnamed]
        if topic in facts and others:
            asked = facts[topic] if rng.random() < 0.5 else choose(rng, others)
            qa.append((text.format(asked), "yes" if asked == facts[topic] else "no", "CLOSED"))
    return qa


def names_caption_only(facts: dict) -> bool:
    return any(facts.get(topic) == value for topic, value in CAPTION_ONLY.items())


def vqa_slice(facts: dict, question: str) -> str:
    """"caption-only" when the image shows a caption-only concept or the question names one: what no
    instruction conversation showed (a kidney lesion, a trichrome section, a yellow lesion), else "seen"."""
    named = any(value in question for value in CAPTION_ONLY.values())
    return "caption-only" if named or names_caption_only(facts) else "seen"


def conversation_from_caption(caption: str, rng: np.random.Generator) -> list[dict]:
    """Stage-2 data: a multi-turn conversation written from the caption text alone (GPT-4's role).

    Each fact is asked about once, in one of its phrasings, in random order (VQA asks every question as the
    first turn), and the description of the whole figure comes after the questions: an answer that an
    earlier turn already gave could be read off the context, and the model would learn to read the
    conversation instead of the image.
    """
    facts = parse_caption(caption)
    by_topic: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for q, a, _ in questions_for(facts, rng, unnamed=frozenset(CAPTION_ONLY.values())):
        by_topic[TOPIC[q]].append((q, a))
    others = [t for t in by_topic if t != "presence"]
    topics = [others[i] for i in rng.permutation(len(others))[: int(rng.integers(2, 5))]]
    # A question about the lesion tells that there is one, so the presence question comes first or not at
    # all; it is asked in half the conversations whatever its answer, which keeps its yes/no balanced.
    if "presence" in by_topic and rng.random() < 0.5:
        topics.insert(0, "presence")
    turns = [(q, reasoned_answer(facts, q, a)) for q, a in (choose(rng, by_topic[t]) for t in topics)]
    if rng.random() < 0.6:
        turns.append((choose(rng, DESCRIBE_PROMPTS), finding_sentence(facts, _reply_pick)))
    conversation = []
    for k, (q, a) in enumerate(turns):
        conversation += [{"from": "human", "value": place_image(q, rng) if k == 0 else q},
                         {"from": "gpt", "value": a}]
    return conversation


def _reply_pick(options: list[str]) -> str:
    """The paraphrase a stage-2 reply uses: the first one in which no article stands before the stain. An
    article would choose the stain before it is written ("an" h&e or ihc, "a" trichrome), and every reply
    stage 2 sees says "an"."""
    return next((o for o in options if not re.search(r"\ban? \S+-stained", o)), options[0])


def reasoned_answer(facts: dict, question: str, answer: str) -> str:
    """A stage-2 reply as GPT-4 writes one: a yes/no first where one is asked, then what the figure shows
    about the fact asked, in the caption's own words ("which organ is the lesion in?" -> "axial ct of the
    abdomen showing a small lesion in the left kidney."). The clause that names an open answer is one that
    concept alignment taught the model to write about an image, so instruction tuning teaches it to answer by
    describing what it sees, where a bare answer would be a new readout over the values its conversations
    happen to give."""
    subject, verb, _, clauses = finding_clauses(facts, _reply_pick)
    shown = subject + (f" {verb} {clauses[TOPIC[question]]}" if TOPIC[question] in clauses else "")
    return f"{answer}, {shown}." if answer in ("yes", "no") else f"{shown}."


def finding_notes(facts: dict) -> list[str]:
    """A scene's findings as a clinician's short notes, in the captions' words."""
    domain = domain_of(facts)
    if domain == "chest_xray":
        return [f"opacity in the {facts['lobe']}" if facts["opacity"] == "yes" else "no opacity",
                "enlarged heart" if facts["heart_enlarged"] == "yes" else "normal heart size"]
    if domain == "histology":
        return [f"{facts['stain']} stain", f"{facts['density']} cell density",
                "atypical nuclei" if facts["atypia"] == "yes" else "no atypical nuclei"]
    notes = [f"the {facts['region']}"] if domain == "ct_scan" else []
    if facts["lesion"] == "no":
        return notes + ["no lesion"]
    if domain == "gross":
        return notes + [f"{facts['size']} lesion", f"{facts['color']} lesion"]
    place = facts.get("organ", "hemisphere")
    return notes + [f"{facts['size']} lesion", f"lesion in the {facts['side']} {place}"]


def text_conversation(caption: str, rng: np.random.Generator) -> list[dict]:
    """Stage-0 text, no image: the assistant writes a figure legend, then answers questions about it.

    This stands in for what LLaMA/Vicuna learned from text before LLaVA existed: to write biomedical
    prose and to use what is in its context. Half the legends are written from the image's type alone,
    half from notes of its findings (in shuffled order): stage 1 only trains the projector, and a frozen
    decoder that has learnt to write a legend from notes in its context can be taught to read the image
    tokens as such notes, where one that never conditioned a legend on its context cannot (its stage-1
    captions stated the findings at chance). Every answer is in the legend the assistant just wrote, so
    nothing here ties an answer to an image.
    """
    facts = parse_caption(caption)
    qa = questions_for(facts, rng)
    request = f"write a figure legend for {_article(facts['modality'])} {facts['modality']} image"
    if rng.random() < 0.5:
        notes = finding_notes(facts)
        request += " with these findings: " + "; ".join(notes[i] for i in rng.permutation(len(notes)))
    conversation = [{"from": "human", "value": request + "."}, {"from": "gpt", "value": caption}]
    for q, a, _ in (qa[i] for i in rng.permutation(len(qa))[: int(rng.integers(1, 3))]):
        conversation += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conversation


# ---------------------------------------------------------------------------------------------------------
# (d) The general domain: one shape over a cluttered background.

GENERAL_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}


def sample_general_scene(rng: np.random.Generator) -> dict:
    return {"shape": choose(rng, ("circle", "square", "triangle")),
            "color": choose(rng, ("red", "green", "blue", "yellow")),
            "size": choose(rng, ("small", "large")), "position": choose(rng, tuple(GENERAL_WHERE)),
            "background": choose(rng, tuple(BACKGROUNDS))}


def general_conversation(f: dict, rng: np.random.Generator) -> list[dict]:
    """Stage-0 data: questions about three of the picture's facts (one phrasing each), then its caption."""
    caption = (f"a {f['size']} {f['color']} {f['shape']} {GENERAL_WHERE[f['position']]} "
               f"on a {f['background']} background.")
    other = choose(rng, ("circle", "square", "triangle"))
    # Asked about its own place half the time, so that the yes/no of a place question is balanced.
    where = f["position"] if rng.random() < 0.5 else choose(rng, [p for p in GENERAL_WHERE if p != f["position"]])
    yes_no = lambda truth: "yes" if truth else "no"  # noqa: E731
    by_topic = [[("what shape is shown?", f["shape"]), (f"is there a {other}?", yes_no(other == f["shape"]))],
                [("what color is the shape?", f["color"])],
                [("where is the shape?", f["position"]),
                 (f"is the shape {GENERAL_WHERE[where]}?", yes_no(where == f["position"]))],
                [("what is the size of the shape?", f["size"]), ("is the shape large?", yes_no(f["size"] == "large"))],
                [("what color is the background?", f["background"])]]
    turns = [choose(rng, by_topic[i]) for i in rng.permutation(len(by_topic))[:3]]
    turns.append((choose(rng, DESCRIBE_PROMPTS), caption))
    conversation = []
    for k, (q, a) in enumerate(turns):
        conversation += [{"from": "human", "value": place_image(q, rng) if k == 0 else q}, {"from": "gpt", "value": a}]
    return conversation
