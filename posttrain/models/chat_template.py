"""Give a base model a chat template: the template, its special tokens, embedding rows, EOS and pad.

Base checkpoints (GPT-2, Pythia, Llama and Mistral base) ship no chat template, yet posttrain
renders every record as chat. `install_chat_template` puts one on the tokenizer — the built-in
ChatML, a Jinja file, or another model's (`from:MODEL`) — adds the markers it writes that the
tokenizer lacks as special tokens, and makes its end-of-turn marker the EOS (pad too, where the
tokenizer has none), so generation stops at the end of a turn. `fit_model_to_tokenizer` then
gives the model a row for each new token, set to the mean of the existing rows, and the same
EOS / pad ids in its config and generation config. Saving model and tokenizer together carries
the format to `generate`, `sample`, reward models and the preference trainers.

Which tokens a template needs is read off a rendering, not declared: a user/assistant
conversation with marker-free contents is rendered with the tokenizer, every `<|…|>` or `<…>`
string in it is a marker (for `from:MODEL`, so are that model's special tokens), and the first
marker after the assistant's reply is the end-of-turn token.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from transformers import AddedToken, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.models.load import load_causal_lm, load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

# ChatML (as in SmolLM2 and Qwen), with no default system prompt: a conversation renders as
# exactly the turns it has. The generation prompt opens the assistant's turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}
"""--chat-template name → template text."""

FROM_MODEL = "from:"
SPEC_HELP = f"{' | '.join(BUILTIN_TEMPLATES)} | FILE.jinja | from:MODEL"

# `<|im_start|>`, `<|eot_id|>`, `<|user|>`; `<s>`, `</s>`, `<start_of_turn>`. The probe's
# contents contain no '<', so every match was written by the template.
MARKER = re.compile(r"<\|[^<>|\s]+\|>|</?[A-Za-z_][\w.-]*>")
PROBE_REPLY = "Probe reply one."
PROBE = [{"role": "user", "content": "Probe question one."},
         {"role": "assistant", "content": PROBE_REPLY},
         {"role": "user", "content": "Probe question two."},
         {"role": "assistant", "content": "Probe reply two."}]


@dataclass(frozen=True)
class TemplateChange:
    """What `install_chat_template` did to a tokenizer, for `fit_model_to_tokenizer` and the log."""

    spec: str
    """The --chat-template value: a built-in name, a .jinja path or from:MODEL."""
    replaced: bool
    """The tokenizer had a chat template of its own, now replaced."""
    added_tokens: tuple[str, ...]
    """Markers the template writes that were not added tokens of the tokenizer, in order of appearance."""
    new_token_ids: tuple[int, ...]
    """Ids the tokenizer gained (a marker already in the base vocabulary keeps its id)."""
    old_vocab_size: int
    """len(tokenizer) before: ids below it are the existing tokens whose rows are averaged."""
    eos_token: str
    """The template's end-of-turn marker, now the tokenizer's EOS."""
    pad_token: str
    """The tokenizer's pad token afterwards (its EOS if it had none)."""

    def summary(self) -> str:
        added = ", ".join(self.added_tokens) or "none"
        replacing = " (replacing the tokenizer's own)" if self.replaced else ""
        return (f"chat template {self.spec}{replacing}: "
                f"added tokens {added} ({len(self.new_token_ids)} new ids); "
                f"eos {self.eos_token}, pad {self.pad_token}")


def is_chat_template_spec(spec: str) -> bool:
    """Whether `spec` has the shape of a --chat-template value (files and models are checked later)."""
    return spec in BUILTIN_TEMPLATES or spec.endswith(".jinja") or (
        spec.startswith(FROM_MODEL) and len(spec) > len(FROM_MODEL))


def read_chat_template(spec: str) -> tuple[str, PreTrainedTokenizerBase | None]:
    """The template text `spec` names, and for from:MODEL that model's tokenizer.

    Raises FileNotFoundError for a missing .jinja file and ValueError for an unknown spec, a
    file that is not UTF-8 text or is empty, and a model whose tokenizer has no template.
    """
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], None
    if spec.startswith(FROM_MODEL) and len(spec) > len(FROM_MODEL):
        name = spec[len(FROM_MODEL):]
        try:
            source = AutoTokenizer.from_pretrained(resolve_model_path(name))
        except (OSError, ValueError) as err:  # a hub id with no network, a folder without a tokenizer
            raise ValueError(f"chat_template {spec!r}: cannot load the tokenizer of {name!r} "
                             f"({' '.join(str(err).split())[:200]})") from None
        template = source.chat_template
        if isinstance(template, dict):  # a tokenizer with named templates (tool use, RAG …)
            template = template.get("default")
        if not template:
            raise ValueError(f"chat_template {spec!r}: the tokenizer of {name!r} has no chat template to copy")
        return template, source
    if spec.endswith(".jinja"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"chat_template {spec!r}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); a chat template is a Jinja text file"
                             ) from None
        if not text.strip():
            raise ValueError(f"{path}: empty chat template")
        return text, None
    raise ValueError(f"chat_template {spec!r} is not one of {SPEC_HELP}")


def _render(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], generation_prompt: bool,
            where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{where}: line {err.lineno}: Jinja syntax error: {err.message}") from None
    except jinja2.TemplateError as err:
        raise ValueError(f"{where}: rendering a user/assistant conversation failed: {err}") from None


def template_markers(tokenizer: PreTrainedTokenizerBase, template: str, where: str,
                     source: PreTrainedTokenizerBase | None = None) -> tuple[list[str], str]:
    """(markers the template writes, in order of first appearance; its end-of-turn marker).

    Rendered with `tokenizer`, so `{{ eos_token }}` / `{{ bos_token }}` become its own. `source`
    (from:MODEL) adds that model's special tokens found in the rendering, e.g. Mistral's [INST].
    The end-of-turn marker is the first one after the reply in a conversation that ends with
    the assistant's turn: the loss (posttrain.data.tokenize) runs through it and sampling stops at it.
    ValueError naming `where` for a Jinja error or an assistant turn that ends with no marker.
    """
    turn = _render(tokenizer, template, PROBE[:2], False, where)
    text = _render(tokenizer, template, PROBE, False, where) + _render(tokenizer, template, PROBE[:1], True, where)
    patterns = [MARKER.pattern]
    if source is not None:
        patterns += [re.escape(t.content) for t in source.added_tokens_decoder.values() if t.special and t.content]
    # Longest first, so a special token that contains a shorter marker is matched whole.
    pattern = re.compile("|".join(sorted(patterns, key=len, reverse=True)))
    markers = list(dict.fromkeys(pattern.findall(text)))
    reply_at = turn.find(PROBE_REPLY)
    if reply_at < 0:
        raise ValueError(f"{where}: an assistant message's content does not appear in the rendering")
    end = pattern.search(turn, reply_at + len(PROBE_REPLY))
    if end is None:
        raise ValueError(f"{where}: the template ends an assistant turn with no marker after the reply "
                         f"({turn[reply_at:][:40]!r}; a marker is <|…|> or <…>), so generation could not stop "
                         "at the end of a turn; end each turn with one, e.g. {{ eos_token }}")
    return markers, end.group()


def install_chat_template(tokenizer: PreTrainedTokenizerBase, spec: str, *, name: str) -> TemplateChange:
    """Put the template `spec` names on `tokenizer` (in place) with its tokens, EOS and pad.

    A tokenizer that has a template of its own gets it replaced, with a warning: passing a
    template is the explicit request. Errors as read_chat_template and template_markers;
    the tokenizer is changed only after both succeed. `name` labels the tokenizer in messages.
    """
    template, source = read_chat_template(spec)
    where = spec if spec.endswith(".jinja") else f"chat_template {spec!r}"
    markers, eos = template_markers(tokenizer, template, where, source)
    replaced = tokenizer.chat_template is not None
    if replaced:
        logger.warning("tokenizer of %r has a chat template; replacing it with %s as asked", name, spec)
    have = tokenizer.get_added_vocab()
    missing = [m for m in markers if m not in have]
    old_size = len(tokenizer)
    # special=True: skipped when decoding replies; normalized=False: matched verbatim.
    tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in missing], special_tokens=True)
    tokenizer.chat_template = template
    tokenizer.eos_token = eos
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss; EOS is the convention (as load_tokenizer).
        tokenizer.pad_token = eos
    change = TemplateChange(spec=spec, replaced=replaced, added_tokens=tuple(missing),
                            new_token_ids=tuple(range(old_size, len(tokenizer))), old_vocab_size=old_size,
                            eos_token=eos, pad_token=tokenizer.pad_token)
    logger.info("%s", change.summary())
    return change


@torch.no_grad()
def fit_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                           change: TemplateChange) -> None:
    """Rows for the tokens `change` added, each the mean of the existing tokens' rows, and the
    tokenizer's EOS / pad ids in model.config and model.generation_config (in place).

    The matrix grows only when the new ids pass its end; a padded matrix (more rows than
    tokens, e.g. Pythia) keeps its size and its spare rows under the new ids are overwritten.
    Input embeddings, an untied output head and its bias are set alike. The mean keeps the new
    tokens' logits at the average of the old ones, so the model's next-token distribution
    barely moves until training teaches them (Hewitt 2021, "Initializing new word embeddings
    for pretrained language models").
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # mean_resizing=True would draw the rows from N(mean, 1e-9·covariance) with the global
        # RNG, over all old rows (a padded matrix's unused ones too), and only past the old end;
        # the rows are set below exactly instead, so only the shape is asked of transformers.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = list(change.new_token_ids)
    existing = min(change.old_vocab_size, rows)
    if new:
        tensors = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not tensors[0]:  # untied head
            tensors.append(head.weight)
        if head is not None and getattr(head, "bias", None) is not None:
            tensors.append(head.bias)
        for tensor in tensors:
            tensor[new] = tensor[:existing].float().mean(dim=0).to(tensor.dtype)
    for config in (model.config, model.generation_config):
        if config is not None:
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer_with_template(name_or_path: str, spec: str) -> tuple[PreTrainedTokenizerBase,
                                                                       TemplateChange | None]:
    """load_tokenizer(name) and None when `spec` is empty; else the tokenizer with `spec`
    installed (whether or not it had a template) and the change, for fit_model_to_tokenizer."""
    if not spec:
        return load_tokenizer(name_or_path), None
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    return tokenizer, install_chat_template(tokenizer, spec, name=name_or_path)


def save_with_chat_template(model: str, spec: str, output: str | os.PathLike) -> Path:
    """`model` with the template `spec` installed, saved as a new folder `output` (not one that
    holds files, in a folder that exists) for the trainers that start from a chat model (rm, dpo,
    kto, ppo, grpo, rloo).

    Written to `output.tmp` and renamed, so a failure leaves nothing behind. Returns `output`.
    """
    if not is_chat_template_spec(spec):
        raise ValueError(f"--template {spec!r} is not one of {SPEC_HELP}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is an existing file; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--output {str(out)!r} is a folder that holds files; expected a new or empty folder")
    # As every other command: a typo in the parent should not make a new tree of folders.
    if not out.parent.is_dir():
        raise ValueError(f"--output {str(out)!r}: folder {str(out.parent)!r} does not exist")
    tokenizer, change = load_tokenizer_with_template(model, spec)
    lm = load_causal_lm(model)
    fit_model_to_tokenizer(lm, tokenizer, change)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"{out}: {change.summary()}; {lm.get_input_embeddings().weight.shape[0]} embedding rows")
    return out

