"""Turn conversations into token ids and a loss mask with the tokenizer's own chat template.

How the loss is located without `{% generation %}` markers (SmolLM2's template has none):
for every assistant turn i the conversation is rendered twice, `messages[:i]` with the
generation prompt and `messages[:i+1]` without, and the first must be a text prefix of the
second (and of every later rendering). The text between the two is what the model writes
in turn i: its reply, its end-of-turn token and whatever glue follows.

Token ids are the concatenation of the pieces between consecutive renderings, each encoded
on its own. That is what the model sees when it generates: the prompt encoded up to the
generation prompt, then the reply tokens one by one. Encoding the whole text at once can
split differently across a boundary (SmolLM2's byte-level BPE encodes the header's "\\n"
followed by a reply starting "\\n\\n" or "  " into other tokens than the prompt and the reply
encoded apart), giving ids that generation never produces.

The loss covers each reply up to and including the tokenizer's EOS token (ChatML's
`<|im_end|>`), so the model learns to stop. The "\\n" the template writes after `<|im_end|>`
is left out: generation ends at EOS, so the model is never asked to predict it; it is glue
before the next turn's header, like the header `<|im_start|>assistant\\n` itself.

Message content is always text. A record whose prompt holds "<|im_end|>\\n<|im_start|>assistant"
must not open a turn of its own, nor a completion holding "<|im_end|>" teach the model to stop
mid-reply, so the tokenizer's special tokens are recognised only where the template wrote them;
the same strings inside a message are split into ordinary tokens (`split_special_tokens`).
Setting POSTTRAIN_SPECIAL_TOKENS_IN_CONTENT=1 lets them act as control tokens, for data that
means them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from posttrain.data.formats import LabelledCompletion, PreferencePair

SPECIAL_TOKENS_IN_CONTENT = "POSTTRAIN_SPECIAL_TOKENS_IN_CONTENT"
"""Environment variable: "1" tokenises special-token strings inside message content as the
control tokens they spell (the tokenizer's default), instead of as text."""


@dataclass
class TokenizedExample:
    """One training sequence. input_ids: [T]. loss_mask: [T], True ⇔ input_ids[t] is a
    prediction target (predicted from position t-1); loss_mask[0] is always False."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask {len(self.loss_mask)}")
        if self.loss_mask and self.loss_mask[0]:
            raise ValueError("loss_mask[0] is True, but the first token has no position to be predicted from")


@dataclass
class TokenizedPair:
    """A tokenized PreferencePair. prompt_ids: [P], ending with the generation prompt.
    chosen_ids: [C] and rejected_ids: [R], the reply tokens after it, each ending with EOS
    unless truncated. margin and source_index as in PreferencePair."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None
    source_index: int

    @property
    def length(self) -> int:
        """Tokens in the longer of the two sequences prompt+chosen and prompt+rejected."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def examples(self) -> tuple[TokenizedExample, TokenizedExample]:
        """prompt+chosen and prompt+rejected as sequences whose loss mask covers the reply."""
        return tuple(  # type: ignore[return-value]
            TokenizedExample(self.prompt_ids + reply, [False] * len(self.prompt_ids) + [True] * len(reply))
            for reply in (self.chosen_ids, self.rejected_ids)
        )


@dataclass
class TokenizedCompletion:
    """A tokenized LabelledCompletion. prompt_ids: [P], ending with the generation prompt.
    completion_ids: [C], the reply tokens after it, ending with EOS unless truncated. label:
    True for desirable. source_index as in LabelledCompletion."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source_index: int

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class _Rendered:
    """A templated conversation. content: the (start, end) character spans of every message's
    content in `text`, to be tokenised as text; found only when some content holds a
    special-token string, and empty otherwise (the tokenizer's own encoding is then the same)."""

    text: str
    content: tuple[tuple[int, int], ...]


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special added tokens, longest first (so a longer one is matched whole)."""
    return sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content),
                  key=len, reverse=True)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> _Rendered:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if os.environ.get(SPECIAL_TOKENS_IN_CONTENT) == "1":
        return _Rendered(text, ())
    specials = _special_strings(tokenizer)
    if not any(s in m["content"] for m in messages for s in specials):
        return _Rendered(text, ())
    return _Rendered(text, _content_spans(tokenizer, messages, text, generation_prompt, specials))


def _content_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], text: str, generation_prompt: bool,
                   specials: list[str]) -> tuple[tuple[int, int], ...]:
    """Where each message's content lies in `text`. The conversation is rendered again with
    every content replaced by a private-use placeholder, which splits the rendering into the
    template's own pieces; the real rendering must then read piece, content, piece, ... with
    each content written as given or stripped (templates that `| trim`). Matching the pieces
    around a content, not searching for it, keeps a content that repeats the template's text
    ("<|im_start|>user\\n") from being mistaken for it."""
    placeholder = re.compile("\ue000([0-9]+)\ue001")
    marked = [{**m, "content": f"\ue000{k}\ue001"} for k, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=generation_prompt)
    pieces = placeholder.split(skeleton)  # template, k, template, k, ..., template
    spans, at = [], len(pieces[0])
    ok = text.startswith(pieces[0])
    for j in range(1, len(pieces) if ok else 1, 2):
        content, after = messages[int(pieces[j])]["content"], pieces[j + 1]
        written = next((c for c in (content, content.strip())
                        if text.startswith(c, at) and text.startswith(after, at + len(c))), None)
        if written is None:
            ok = False
            break
        spans.append((at, at + len(written)))
        at += len(written) + len(after)
    if not ok or at != len(text):
        found = next(s for m in messages for s in specials if s in m["content"])
        raise ValueError(
            f"a message contains the special token {found!r}, and the chat template changes message text in a "
            "way that hides where the message lies, so it cannot be tokenised as text; remove it from the data, "
            f"or set {SPECIAL_TOKENS_IN_CONTENT}=1 to let it act as a control token")
    return tuple(spans)


def _encode(tokenizer: PreTrainedTokenizerBase, rendered: _Rendered, start: int = 0) -> list[int]:
    """Token ids of rendered.text[start:].

    The template writes every special token itself (SmolLM2's <|im_start|>, or a BOS in other
    templates); the tokenizer must not add its own on top. Inside rendered.content only text
    tokens are made: the text is cut at the special tokens the template wrote, as the tokenizer
    itself cuts it, and each run between them is encoded with special tokens split.
    """
    text = rendered.text
    if not rendered.content:
        return tokenizer(text[start:], add_special_tokens=False)["input_ids"]
    pattern = re.compile("|".join(re.escape(s) for s in _special_strings(tokenizer)))
    template_parts = zip([0, *(end for _, end in rendered.content)], [*(a for a, _ in rendered.content), len(text)])
    cuts = [m.span() for a, b in template_parts for m in pattern.finditer(text, max(a, start), b)]
    ids: list[int] = []
    at = start
    for a, b in cuts:
        if a > at:
            ids += tokenizer(text[at:a], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tokenizer.convert_tokens_to_ids(text[a:b]))
        at = b
    if at < len(text):
        ids += tokenizer(text[at:], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end assistant turns with")
    return tokenizer.eos_token_id


def _extend(rendered: str, longer: str, what: str) -> str:
    """The text `longer` adds after `rendered` (the rendering of `what`); ValueError naming
    the template problem if `longer` does not start with it."""
    if longer.startswith(rendered):
        return longer[len(rendered):]
    at = next((i for i, (a, b) in enumerate(zip(rendered, longer)) if a != b), min(len(rendered), len(longer)))
    raise ValueError(
        f"chat template renders {what} differently once later messages follow (first difference at "
        f"character {at}: {rendered[at:at + 30]!r} vs {longer[at:at + 30]!r}); loss masking needs a template "
        "that renders each turn the same whatever comes after it"
    )


def _reply_span(tokenizer: PreTrainedTokenizerBase, reply: list[int], reply_text: str) -> int:
    """Number of reply tokens up to and including the last EOS."""
    eos = _eos_id(tokenizer)
    if eos not in reply:
        raise ValueError(
            f"chat template does not end the assistant turn with the EOS token {tokenizer.eos_token!r}: "
            f"the reply renders as {reply_text[-60:]!r}"
        )
    return len(reply) - reply[::-1].index(eos)


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool = False
) -> TokenizedExample:
    """Token ids of the templated conversation and its loss mask.

    Default: the mask covers every assistant reply through its EOS token (not the role
    header, not the "\\n" after EOS). train_on_prompt=True: every token but the first.
    """
    ids: list[int] = []
    mask: list[bool] = []
    rendered, n_rendered = "", 0  # text of messages[:n_rendered], already in ids
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with_prompt = _render(tokenizer, messages[:i], True)
        _extend(rendered, with_prompt.text, f"the first {n_rendered} messages")
        with_reply = _render(tokenizer, messages[: i + 1], False)
        reply_piece = _extend(with_prompt.text, with_reply.text, f"the first {i} messages and the generation prompt")
        prompt_ids = _encode(tokenizer, with_prompt, len(rendered))
        reply_ids = _encode(tokenizer, with_reply, len(with_prompt.text))
        rendered, n_rendered = with_reply.text, i + 1
        n_loss = _reply_span(tokenizer, reply_ids, reply_piece)
        ids += prompt_ids + reply_ids
        mask += [False] * len(prompt_ids) + [True] * n_loss + [False] * (len(reply_ids) - n_loss)
    whole = _render(tokenizer, messages, False)
    _extend(rendered, whole.text, f"the first {n_rendered} messages")
    tail_ids = _encode(tokenizer, whole, len(rendered))
    ids += tail_ids
    mask += [False] * len(tail_ids)
    if train_on_prompt:
        mask = [True] * len(ids)
    if mask:
        mask[0] = False
    return TokenizedExample(ids, mask)


def tokenize_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids [P] of the templated prompt with the generation prompt appended."""
    return _encode(tokenizer, _render(tokenizer, messages, True))


def _reply_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], prompt_text: str, reply: list[dict]
) -> list[int]:
    whole = _render(tokenizer, prompt + reply, False)
    piece = _extend(prompt_text, whole.text, "the prompt and the generation prompt")
    ids = _encode(tokenizer, whole, len(prompt_text))
    return ids[: _reply_span(tokenizer, ids, piece)]


def tokenize_pair(
    pair: PreferencePair, tokenizer: PreTrainedTokenizerBase, *, max_length: int | None = None
) -> TokenizedPair:
    """Prompt ids with generation prompt, and chosen / rejected reply ids through their EOS.

    With max_length, an overlong pair (prompt + longer reply > max_length) is truncated:
    first the prompt from the left, but to no fewer than min(prompt length, max_length // 2)
    tokens, so a long reply cannot squeeze out the whole question; then both replies from
    the right to fit what is left. Truncated replies lose their EOS.
    """
    rendered_prompt = _render(tokenizer, pair.prompt, True)
    prompt_text, prompt_ids = rendered_prompt.text, _encode(tokenizer, rendered_prompt)
    chosen_ids = _reply_ids(tokenizer, pair.prompt, prompt_text, pair.chosen)
    rejected_ids = _reply_ids(tokenizer, pair.prompt, prompt_text, pair.rejected)
    tokenized = TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair.margin, pair.source_index)
    if max_length is None or tokenized.length <= max_length:
        return tokenized
    if max_length < 2:
        raise ValueError(f"max_length: expected at least 2 tokens for a prompt and a reply, got {max_length}")
    longest = max(len(chosen_ids), len(rejected_ids))
    keep_prompt = max(max_length - longest, min(len(prompt_ids), max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    room = max_length - len(prompt_ids)
    return TokenizedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], pair.margin, pair.source_index)


def tokenize_completion(
    example: LabelledCompletion, tokenizer: PreTrainedTokenizerBase, *, max_length: int | None = None
) -> TokenizedCompletion:
    """Prompt ids with generation prompt, and the completion's ids through its EOS; an overlong
    example is truncated as `tokenize_pair` truncates a pair whose replies are both this one."""
    pair = tokenize_pair(PreferencePair(example.prompt, example.completion, example.completion, None,
                                        example.source_index), tokenizer, max_length=max_length)
    return TokenizedCompletion(pair.prompt_ids, pair.chosen_ids, example.label, example.source_index)
