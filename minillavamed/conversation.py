"""Conversation templates and label masking (paper §4 training: "the model is trained to predict the
assistant's answers"; stage 1 concept alignment uses the caption-only `plain` format).

Every string here is rendered byte-for-byte as haotian-liu/LLaVA's `conversation.py` renders it, and the
labels are masked by the same algorithms as LLaVA's `train.py` (`preprocess_plain`, `preprocess_v1`,
`preprocess_llama_2`, and the `###` fallback `preprocess` that LLaVA-Med v1 trained with). With an image,
`llava_med_v1` gives v1.0's own ids only with `im_start_end=True` (below); without it, the image is placed
and marked as LLaVA v1.5 does, which no LLaVA-Med v1 checkpoint was trained on. Those algorithms
measure each round by tokenizing it on its own; we keep them literally, quirks included, because that
is what the released weights were trained on:
  - `vicuna_v1` / `mistral_instruct`: the round lengths must add up to the whole conversation's length,
    otherwise LLaVA masks the whole sample ("tokenization mismatch") and so do we (the dataset then drops
    it and counts it). Deviation: we drop it even when it is longer than max_len; LLaVA skips the check
    past model_max_length and trains the earlier rounds of such a sample, whose mask may already be off,
    so we do not.
  - `llava_med_v1` (`###`): each message is measured as "### Role: text\n" tokenized alone, BOS
    included, so the mask drifts at least one token per message. With LLaMA's vocabulary it trains the
    assistant messages with their "### Assistant:" header plus the first tokens of the next human
    header (how LLaVA-Med v1 learned to stop on "###"). With a vocabulary that merges "\n###" into one
    piece (small trained ones) the drift grows and human text gets trained: use vicuna_v1 for new models.

Where the image goes. LLaVA v1.5's preprocessing (the default here) moves "<image>" to the front of its
message and gives it one sentinel id. LLaVA-Med v1.0 trained with `mm_use_im_start_end` instead: "<image>"
stays where the record put it and becomes "<im_start>" + one "<im_patch>" per image patch + "<im_end>"
(three tokens v1 added to the vocabulary). `im_start_end=True` does exactly that, with the run of patches
as one sentinel (the model splices the patch features there, between the start and end tokens); the ids
and labels then equal v1.0's train.py, patches expanded. Its eval scripts put the image after the
question, and so does `build_prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .tokenizer import Tokenizer

IMAGE = "<image>"
# LLaVA-Med v1's image markers, added to its vocabulary in this order (after LLaMA's 32000 pieces and [PAD]).
IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"


class _Uniform(Protocol):  # random.Random or numpy's Generator
    def random(self) -> float: ...


def place_image(question: str, rng: _Uniform) -> str:
    """The first question of a training record with the image before or after it, at random: the paper's
    post-processing of its instruction data, so that neither position is learnt."""
    return f"{IMAGE}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE}"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# conv_v1_2, LLaVA-Med v1's default conversation (it says "human" where vicuna_v1 says "user").
V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Template:
    """One of LLaVA's conversation formats; `style` picks how it is rendered and masked."""

    name: str
    style: str  # "plain" | "sharp" (###) | "two" | "llama_2"
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    # Strings that end a generated reply. Never empty: mistral_instruct's sep="" made the LLaVA-Med v1.5
    # CLI stop keyword "" (found in every output), cutting answers after one token.
    stop_strings: tuple[str, ...]


TEMPLATES: dict[str, Template] = {
    t.name: t for t in (
        Template("plain", "plain", "", ("", ""), "\n", "", ("\n",)),
        Template("llava_med_v1", "sharp", V1_SYSTEM, ("Human", "Assistant"), "###", "", ("###",)),
        Template("vicuna_v1", "two", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", ("</s>",)),
        Template("mistral_instruct", "llama_2", "", ("USER", "ASSISTANT"), "", "</s>", ("</s>", "[INST]")),
    )
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _messages(conversations: Sequence[dict], with_image: bool, im_start_end: bool = False) -> list[tuple[str, str]]:
    """LLaVA's records → (speaker, text) pairs, after LLaVA's own clean-up.

    With an image, `preprocess_multimodal` moves "<image>" to the front of its message followed by a
    newline (v1.0's, under `im_start_end`, leaves it in place). A conversation that opens with the
    assistant loses that first message (LLaVA skips it).
    """
    if not conversations:
        raise ValueError("empty conversation")
    out = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {k} is not a {{'from', 'value'}} dict: {turn!r}")
        speaker, value = turn["from"], turn["value"]
        # v1.0's train.py compares the speaker lower-cased ("Human", "GPT" are read too).
        speaker = speaker.lower() if isinstance(speaker, str) else speaker
        if speaker not in ("human", "gpt"):
            raise ValueError(f"turn {k}: unknown speaker {speaker!r} (expected 'human' or 'gpt')")
        if not isinstance(value, str):
            value = str(value)  # some released VQA files hold bare numbers as answers
        if with_image and IMAGE in value and not im_start_end:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append((speaker, value))
    return out


def _alternating(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if messages[0][0] != "human":
        messages = messages[1:]
    for k, (speaker, _) in enumerate(messages):
        if speaker != ("human", "gpt")[k % 2]:
            raise ValueError(f"message {k} is from {speaker!r}: turns must alternate human, gpt, ...")
    if not messages:
        raise ValueError("conversation has no human message")
    return messages


def _render_turns(t: Template, messages: Sequence[tuple[str, str | None]]) -> str:
    """LLaVA's `Conversation.get_prompt`; a None reply leaves the prompt open for the assistant."""
    if t.style == "two":
        seps = (t.sep, t.sep2)
        ret = t.system + seps[0]
        for k, (_, msg) in enumerate(messages):
            role = t.roles[k % 2]
            ret += role + ": " + msg + seps[k % 2] if msg else role + ":"
        return ret
    if t.style == "llama_2":
        ret = ""
        for k, (_, msg) in enumerate(messages):
            if not msg:
                continue
            if k == 0 and t.system:
                msg = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" + msg
            ret += t.sep + f"[INST] {msg} [/INST]" if k % 2 == 0 else " " + msg + " " + t.sep2
        return ret.lstrip(t.sep)
    if t.style == "sharp":
        # `_add_speaker_and_signal`: the training format of LLaVA-Med v1 (not conv_v1_2.get_prompt).
        ret = t.system + "\n\n"
        for speaker, msg in messages:
            role = t.roles[0] if speaker == "human" else t.roles[1]
            ret += f"### {role}: {msg}\n" if msg is not None else f"### {role}:"
        return ret if messages and messages[-1][1] is None else ret + "### "
    raise ValueError(f"template {t.name!r} has no multi-turn rendering")


def render(template: Template, conversations: Sequence[dict], with_image: bool = True,
           im_start_end: bool = False) -> str:
    """The training text of one LLaVA record's "conversations" list."""
    messages = _messages(conversations, with_image, im_start_end)
    if template.style == "plain":
        # preprocess_plain: the human message is replaced by the bare image; the caption follows it.
        if len(messages) != 2 or not with_image or IMAGE not in messages[0][1]:
            raise ValueError("plain (concept alignment) needs exactly one human turn with <image> "
                             "and one gpt turn")
        return IMAGE + messages[1][1] + template.sep
    if template.style == "sharp":
        return _render_turns(template, messages)
    return _render_turns(template, _alternating(messages))


def build_prompt(template: Template, question: str, history: Sequence[tuple[str, str]] = (),
                 with_image: bool = True, im_start_end: bool = False) -> str:
    """The prompt for generation, ending where the assistant's reply begins.

    `history` holds earlier (question, answer) pairs; the image goes in front of the first question (after
    it with `im_start_end`, as LLaVA-Med v1.0's model_vqa_med.py and run_llava.py put it).
    For `plain` the prompt is the bare image: stage 1 never saw a question, so the question is dropped.
    For `llava_med_v1` it is the training format (LLaVA-Med v1's eval scripts prompted with a different
    `simple` template; the model was trained on this one).
    """
    if template.style == "plain":
        return IMAGE
    questions = [q for q, _ in history] + [question]
    if with_image and im_start_end:
        questions[0] = questions[0].replace(IMAGE, "").strip() + "\n" + IMAGE
    elif with_image:
        questions[0] = IMAGE + "\n" + questions[0].replace(IMAGE, "").strip()
    messages: list[tuple[str, str | None]] = []
    for k, q in enumerate(questions):
        messages.append(("human", q))
        messages.append(("gpt", history[k][1] if k < len(history) else None))
    return _render_turns(template, messages)


def tokenize_prompt(text: str, tokenizer: Tokenizer, with_image: bool = True,
                    im_start_end: bool = False) -> list[int]:
    """LLaVA's `tokenizer_image_token`: BOS once, then each chunk between "<image>"s, joined by the
    image sentinel. Without an image the text is tokenized whole ("<image>" stays text).

    With `im_start_end` (LLaVA-Med v1.0): the whole text is tokenized with each "<image>" spelled
    "<im_start><im_patch><im_end>", and the patch becomes the sentinel; the tokenizer must hold the three
    added tokens (a v1 checkpoint's added_tokens.json)."""
    if not with_image:
        return tokenizer.encode(text, bos=True)
    if im_start_end:
        missing = [t for t in (IM_START, IM_PATCH, IM_END) if t not in tokenizer.added]
        if missing:
            raise ValueError(f"mm_use_im_start_end needs {missing} in the tokenizer's added tokens "
                             f"({tokenizer.path}: put LLaVA-Med v1's added_tokens.json beside it)")
        patch = tokenizer.added[IM_PATCH]
        ids = tokenizer.encode(text.replace(IMAGE, IM_START + IM_PATCH + IM_END), bos=True)
        return [IMAGE_TOKEN_INDEX if i == patch else i for i in ids]
    ids = [tokenizer.bos_id]
    for k, chunk in enumerate(text.split(IMAGE)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk))
    return ids


def tokenize_conversation(template: Template, conversations: Sequence[dict], tokenizer: Tokenizer,
                          with_image: bool = True, im_start_end: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids with the image sentinel, labels with IGNORE_INDEX) as LLaVA's preprocessing gives."""
    tok = lambda s: tokenize_prompt(s, tokenizer, with_image, im_start_end)  # noqa: E731
    text = render(template, conversations, with_image, im_start_end)
    ids = tok(text)
    labels = list(ids)

    if template.style == "plain":
        labels[:len(tok(IMAGE))] = [IGNORE_INDEX] * len(tok(IMAGE))
    elif template.style == "sharp":
        messages = _messages(conversations, with_image, im_start_end)
        pieces = [f"### {template.roles[0 if s == 'human' else 1]}: {v}\n" for s, v in messages]
        cur = len(tok(template.system + "\n\n"))
        _mask(labels, 0, cur)
        for piece, (speaker, _) in zip(pieces, messages):
            n = len(tok(piece))
            if speaker == "human":
                _mask(labels, cur + 2, cur + n)
            cur += n
    else:
        # preprocess_v1 / preprocess_llama_2 (legacy tokenizer: no per-round correction).
        sep = template.sep + template.roles[1] + ": " if template.style == "two" else "[/INST] "
        total = sum(1 for i in ids if i != tokenizer.pad_id)
        cur = 1
        labels[0] = IGNORE_INDEX
        for rnd in text.split(template.sep2):
            if rnd == "":
                break
            parts = rnd.split(sep)
            if len(parts) != 2:
                break
            _mask(labels, cur, cur + len(tok(parts[0] + sep)) - 2)
            cur += len(tok(rnd))
        _mask(labels, cur, len(labels))
        if cur != total:
            labels = [IGNORE_INDEX] * len(labels)

    # The sentinel stands for the image patches, which are never predicted.
    labels = [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else y for i, y in zip(ids, labels)]
    return ids, labels


def _mask(labels: list[int], start: int, stop: int) -> None:
    for k in range(max(start, 0), min(stop, len(labels))):
        labels[k] = IGNORE_INDEX
