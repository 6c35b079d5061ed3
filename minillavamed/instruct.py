"""GPT-4 self-instruct data synthesis (paper §3, "Biomedical Visual Instruction-Following Data").

A language-only model is shown a figure's caption (and, for the "inline mention" variant, the sentences of the
paper that cite the figure) and writes a conversation about the figure as if both sides could see it. This file
holds every piece of that but the run loop (generate_data.py) and the API client (api.py): the system prompt,
our own few-shot examples for the five domains (chest X-ray, CT, MRI, histology, gross pathology), query
building, reply parsing and post-processing into LLaVA conversation records, and the concept-alignment records
of stage 1.
"""

import itertools
import random
import re

from minillavamed.conversation import place_image

# ----------------------------------------------------------------------------- prompts

SYSTEM_PROMPT = """You are an AI assistant with expertise in biomedicine and medical imaging.

You are given the caption of a figure from a biomedical research article and, sometimes, sentences from the \
article that refer to the figure (Figure Context). You cannot see the figure itself.

Write a conversation between a person (User) who is looking at the figure and asks about it, and you \
(Assistant) answering. Write it as if both of you were looking at the image, never as if you had read a text.

Rules:
- Ask about what can be seen: the imaging modality, the anatomy or tissue, the findings, their location, size \
and appearance, and what they may indicate. Vary the kinds of questions.
- Never say "caption", "context", "description" or "mentioned"; say what is visible "in the image".
- Do not quote identifiers that only a text would reveal (panel letters, patient numbers, dates, author names).
- Include at least two rounds of question and answer. Answers are detailed and careful about uncertainty.
- Do not give medical advice or a diagnosis for a real person; suggest a healthcare professional when relevant.
- Format every turn on its own line starting with "User:" or "Assistant:"."""

# Our own examples, one per domain. Each shows the format and the tone: image-grounded questions, no mention of
# the text the conversation was written from.
FEW_SHOT_EXAMPLES = [
    {"domain": "chest_xray", "fig_label": "Figure 2",
     "fig_caption": "Frontal chest radiograph showing a large left-sided pleural effusion with blunting of the "
                    "costophrenic angle and mild mediastinal shift to the right.",
     "in_text_mention": ["On admission the chest film (Figure 2) showed a large effusion on the left, which was "
                         "drained the same day."],
     "conversation": [
         ("What kind of image is this?",
          "This is a frontal (posteroanterior or anteroposterior) chest X-ray showing the lungs, heart, "
          "mediastinum and the bony thorax."),
         ("Which side looks abnormal?",
          "The left hemithorax looks abnormal. Its lower part is uniformly white, which is typical of fluid "
          "collecting in the pleural space, a pleural effusion. The sharp angle where the diaphragm meets the "
          "chest wall on that side is lost."),
         ("Is anything else displaced?",
          "The mediastinum, including the heart and trachea, appears pushed slightly toward the right. A large "
          "collection of fluid can push these structures away from the affected side. A physician would "
          "correlate this with the clinical picture.")]},
    {"domain": "ct_scan", "fig_label": "Fig. 1",
     "fig_caption": "Axial contrast-enhanced CT of the abdomen demonstrating a 4 cm hypodense lesion in the "
                    "right hepatic lobe with peripheral rim enhancement, consistent with a hepatic abscess.",
     "in_text_mention": [],
     "conversation": [
         ("Which organ is the main finding in?",
          "The main finding is in the liver, in its right lobe. The slice is an axial CT of the upper abdomen "
          "taken after intravenous contrast."),
         ("How does the lesion look?",
          "It is a rounded area darker than the surrounding liver, meaning lower attenuation, a few "
          "centimetres across. Its rim is brighter than its centre, so the wall takes up contrast while the "
          "core does not."),
         ("What could cause that appearance?",
          "A dark centre with an enhancing rim is often seen with a collection such as an abscess, although "
          "some tumours with a dead centre can look similar. Confirming the cause needs clinical information "
          "and often further tests.")]},
    {"domain": "mri", "fig_label": "Figure 3",
     "fig_caption": "Axial T2-FLAIR MRI showing confluent periventricular white matter hyperintensities and a "
                    "few ovoid lesions perpendicular to the lateral ventricles.",
     "in_text_mention": ["The lesion pattern on MRI (Figure 3) supported the diagnosis of a demyelinating "
                         "disease."],
     "conversation": [
         ("What is shown in this scan?",
          "This is an axial MRI slice of the brain, a FLAIR sequence, in which fluid in the ventricles is "
          "dark and many abnormalities of the brain tissue appear bright."),
         ("Where are the bright spots?",
          "The bright areas sit in the white matter around the lateral ventricles. Some merge into larger "
          "patches, and a few are oval and point away from the ventricles at right angles."),
         ("What do such lesions usually suggest?",
          "Oval lesions oriented perpendicular to the ventricles are a pattern often associated with "
          "demyelinating diseases such as multiple sclerosis, but other conditions can produce white matter "
          "bright spots, so a neurologist interprets them together with the clinical findings.")]},
    {"domain": "histology", "fig_label": "Figure 4",
     "fig_caption": "H&E stained section (x200) of colonic mucosa showing crypt distortion, crypt abscesses "
                    "and a dense lymphoplasmacytic infiltrate in the lamina propria.",
     "in_text_mention": ["Biopsies (Figure 4) showed features of chronic active colitis."],
     "conversation": [
         ("What tissue is this and how is it stained?",
          "This is a microscopic section of the lining of the large bowel, stained with haematoxylin and "
          "eosin, where nuclei are purple-blue and cytoplasm and connective tissue are pink."),
         ("Do the glands look normal?",
          "No. Normal colonic crypts are straight and evenly spaced like test tubes in a rack. Here they are "
          "irregular, branched and unevenly spaced, and some contain clusters of inflammatory cells inside "
          "their lumen."),
         ("What are the many small dark cells between the glands?",
          "They are inflammatory cells, mainly lymphocytes and plasma cells, crowding the connective tissue "
          "between the crypts. Together with the distorted glands, this pattern points to long-standing "
          "inflammation of the bowel lining.")]},
    {"domain": "gross", "fig_label": "Figure 5",
     "fig_caption": "Gross photograph of a bisected kidney with a well-circumscribed, golden-yellow tumour at "
                    "the upper pole showing areas of haemorrhage and necrosis.",
     "in_text_mention": [],
     "conversation": [
         ("What organ is in this photograph?",
          "It is a kidney that has been cut in half lengthwise after removal, showing its cut surface with "
          "the outer cortex and the inner medulla and collecting system."),
         ("What stands out on the cut surface?",
          "At one pole there is a rounded mass with a clear border. Much of it is golden yellow, with dark "
          "red areas that look like bleeding and pale, soft-looking areas that may be dead tissue."),
         ("Does the colour tell us anything?",
          "A golden-yellow cut surface is typical of tumours rich in lipid, a classic look of clear cell renal "
          "cell carcinoma, but only microscopic examination by a pathologist can establish the diagnosis.")]},
]

# Stage 1 (concept alignment) instructions; one is sampled per caption. Our own wording.
DESCRIBE_INSTRUCTIONS = [
    "Describe the figure.",
    "Describe the image concisely.",
    "What does this image show?",
    "Summarize the content of this figure.",
    "Provide a short description of the biomedical image.",
    "Write a caption for this figure.",
    "What is shown in this picture?",
    "Explain what can be seen in this image.",
    "Give a brief account of the visual content of the figure.",
    "Describe the main findings visible in this image.",
]


def mention_texts(mentions) -> list[str]:
    """The citing sentences of a PMC record's "in_text_mention", in any shape the released files use: a list
    of strings or of {"tokens": sentence} dicts (what LLaVA-Med's instruct_generate.py reads), a single
    string, or null."""
    if not mentions:
        return []
    if isinstance(mentions, str):
        mentions = [mentions]
    out = []
    for m in mentions:
        if isinstance(m, dict):
            m = m.get("tokens") or ""
        if not isinstance(m, str):
            raise ValueError(f"in_text_mention entry {m!r} is neither a string nor a {{'tokens': ...}} dict")
        if m.strip():
            out.append(m.strip())
    return out


def pmc_records(data) -> list[dict]:
    """PMC figure records from a loaded JSON file: a list, or LLaVA-Med's {domain: [records]} object, taken
    round-robin over the domains as its instruct_generate.py does (a record without "domain" gets its key).
    A record without "image" gets LLaVA-Med's name for it, pair_id + ".jpg" (instruct_postprocess.py)."""
    if isinstance(data, dict):
        columns = [[r if not isinstance(r, dict) or "domain" in r else {**r, "domain": d} for r in rs]
                   for d, rs in data.items()]
        data = [r for row in itertools.zip_longest(*columns) for r in row if r is not None]
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of records or an object of {domain: [records]}")
    return [{**r, "image": f"{r['pair_id']}.jpg"} if isinstance(r, dict) and "image" not in r
            and isinstance(r.get("pair_id"), str) else r for r in data]


def figure_context(record: dict, inline_mentions: bool) -> str:
    """The query text: caption (with its label), plus the citing sentences when inline mentions are on."""
    label = record.get("fig_label")
    text = "Figure Caption:\n" + (f"{label}: " if label else "") + record["fig_caption"].strip()
    mentions = mention_texts(record.get("in_text_mention")) if inline_mentions else []
    if mentions:
        text += "\n\nFigure Context:\n" + "\n".join(f"- {m}" for m in mentions)
    return text


def build_messages(record: dict, inline_mentions: bool = False) -> list[dict]:
    """System prompt, the five few-shot exchanges (all in every query, as the paper does), then the query."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex in FEW_SHOT_EXAMPLES:
        reply = "\n\n".join(f"User: {q}\nAssistant: {a}" for q, a in ex["conversation"])
        messages += [{"role": "user", "content": figure_context(ex, inline_mentions)},
                     {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": figure_context(record, inline_mentions)})
    return messages


# ----------------------------------------------------------------------------- reply parsing

class ReplyError(ValueError):
    """A reply that holds no usable conversation; the message says why and is safe to log."""


HUMAN_ROLES = {"user", "human", "question", "q"}
GPT_ROLES = {"assistant", "gpt", "gpt-4", "gpt4", "ai", "answer", "a"}
# A role label at the start of a line, tolerating what models add around it: list markers ("1.", "-"),
# markdown headings and bold ("**User:**", "**User**:"), and turn numbers ("User 2:").
ROLE_RE = re.compile(
    r"^[ \t]*(?:(?:\d+[.)]|[-*>]|#{1,6})[ \t]+)?[*_]{0,2}[ \t]*"
    r"(user|human|question|q|assistant|gpt-?4|gpt|ai|answer|a)[ \t]*\d*[ \t]*[*_]{0,2}[ \t]*:[ \t]*[*_]{0,2}",
    re.IGNORECASE | re.MULTILINE)
REFUSAL_RE = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry|i can(?:no|')t|i am unable|i'?m unable|as an ai)",
                        re.IGNORECASE)


def parse_reply(text: str) -> list[tuple[str, str]]:
    """Split a model reply into (question, answer) pairs.

    Text before the first role label (e.g. "Sure, here is a conversation:") is dropped; consecutive turns of
    the same role are merged (a stray repeated label); a leading answer and a trailing unanswered question
    are dropped.
    """
    matches = list(ROLE_RE.finditer(text or ""))
    if not matches:
        if REFUSAL_RE.match(text or ""):
            raise ReplyError(f"refusal: {text.strip()[:120]!r}")
        raise ReplyError(f"no role labels (User:/Assistant:) in reply: {(text or '').strip()[:120]!r}")
    turns: list[list[str]] = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        role = "human" if m.group(1).lower() in HUMAN_ROLES else "gpt"
        body = text[m.end(): nxt.start() if nxt else len(text)]
        body = re.sub(r"\n\s*(?:-{3,}|\*{3,})\s*$", "", body)  # markdown rule between turns
        body = re.sub(r"\n{3,}", "\n\n", body).strip().strip("*_").strip()
        if not body:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + body
        else:
            turns.append([role, body])
    while turns and turns[0][0] == "gpt":
        turns.pop(0)
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    if not pairs:
        raise ReplyError(f"no complete question/answer pair in reply: {text.strip()[:120]!r}")
    return pairs


# An answer that admits the model never saw the image teaches the wrong thing: the pair is dropped.
NO_ACCESS_RE = re.compile(
    r"(can ?not|can't|unable to|not able to|don't|do not) (see|view|access|look at)|"
    r"(without|no|don't have|do not have) (direct )?access to|as an ai\b|image (itself )?is not (available|provided)|"
    r"not (mentioned|specified|provided|described) in the (figure )?(caption|description|context|text)",
    re.IGNORECASE)
# "Based on the caption, ..." style openings, kept "Yes, "/"No, " in front.
TEXT_PREFIX_RE = re.compile(
    r"^(?P<yn>(?:yes|no),\s+)?(?:based on|according to|from|judging from|as (?:stated|described|mentioned) in)\s+"
    r"(?:the\s+)?(?:provided\s+|given\s+|figure\s+|image\s+|additional\s+)*"
    r"(?:caption|description|context|information|text)(?:\s+(?:provided|given))?\s*,\s*", re.IGNORECASE)
TEXT_INFIX_RE = re.compile(
    r",?\s*(?:as|which is)?\s*(?:mentioned|described|indicated|stated|noted) in the (?:provided |given )?"
    r"(?:figure |image )?(?:caption|description|context)", re.IGNORECASE)
TEXT_WORD_RE = re.compile(r"\b(caption|figure context|text description|image description)\b", re.IGNORECASE)


def _strip_text_references(s: str) -> str:
    m = TEXT_PREFIX_RE.match(s)
    if m:
        rest = s[m.end():]
        s = (m.group("yn") or "").capitalize() + (rest[:1].lower() if m.group("yn") else rest[:1].upper()) + rest[1:]
    return TEXT_INFIX_RE.sub("", s).strip()


def clean_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Post-processing: drop no-access pairs, strip text-reference phrases, drop pairs still citing the text."""
    out = []
    for q, a in pairs:
        if NO_ACCESS_RE.search(a):
            continue
        q, a = _strip_text_references(q), _strip_text_references(a)
        if not q or not a or TEXT_WORD_RE.search(a):
            continue
        out.append((q, a))
    return out


def record_rng(seed: int, pair_id: str) -> random.Random:
    """A per-record generator: choices stay the same whatever the order or concurrency of a (resumed) run."""
    return random.Random(f"{seed}:{pair_id}")


def _llava_record(record: dict, conversations: list[dict]) -> dict:
    out = {"id": record["pair_id"], "image": record["image"]}
    if "domain" in record:
        out["domain"] = record["domain"]
    out["conversations"] = conversations
    return out


def to_llava_record(record: dict, reply: str, rng: random.Random) -> dict:
    """Instruction-tuning record (stage 2) from a model reply; ReplyError when nothing usable is left."""
    pairs = clean_pairs(parse_reply(reply))
    if not pairs:
        raise ReplyError("no usable turns left after post-processing (all admitted no image access "
                         "or cited the caption)")
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": place_image(q, rng) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return _llava_record(record, conv)


def alignment_record(record: dict, rng: random.Random) -> dict:
    """Concept-alignment record (stage 1): a sampled "describe the figure" instruction -> the caption."""
    instruction = rng.choice(DESCRIBE_INSTRUCTIONS)
    return _llava_record(record, [{"from": "human", "value": place_image(instruction, rng)},
                                  {"from": "gpt", "value": record["fig_caption"].strip()}])
