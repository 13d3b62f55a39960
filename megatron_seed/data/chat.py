"""Chat rendering for supervised fine-tuning: conversations -> token ids + loss mask.

A conversation is rendered with the tokenizer's own chat template, the way transformers'
``apply_chat_template`` renders it (same Jinja sandbox, globals, filters and template variables,
``trim_blocks``/``lstrip_blocks``), or with :data:`DEFAULT_CHAT_TEMPLATE` (ChatML, no default system
prompt) when the tokenizer has none, which is the case for the BPE tokenizers we train. The Jinja
environment is replicated here rather than imported because transformers is a test-only dependency
of this package; the tests compare our ids with transformers' ``apply_chat_template``.

Control tokens. The template's own control tokens (``<|im_start|>``) become one control id each;
the same text inside a message is encoded as text (the project's policy for special-token text in
data, and what transformers does with ``apply_chat_template(..., sanitize_control_tokens=True)``:
we use its markers and its piece-wise encoding, so on ordinary text both modes give the same ids).
For an HF tokenizer we encode with the ``tokenizers`` backend directly, not with our
:mod:`~megatron_seed.data.tokenizer` wrapper, because the wrapper encodes every special-token text
as text and has no character offsets, both of which the loss mask needs. When the default ChatML
template meets a vocabulary without ``<|im_start|>``/``<|im_end|>`` (ours, the byte tokenizer), the
two strings become the tokenizer's bos/eos ids, Seed-Coder-Instruct's turn delimiters, so no
embedding has to be added.

Loss mask. Assistant spans are found by rendering prefixes: for assistant message ``i`` the turn
text is ``render(messages[:i+1])`` minus ``render(messages[:i], add_generation_prompt=True)``, so the
role header is never trained. Inside it the loss covers everything up to and including the turn's
last control token (ChatML: the content and ``<|im_end|>``, not the newline after it); that is exact
also for templates that write text after the content. A template whose prefixes are not prefixes of
the whole rendering (one that rewrites earlier turns) is refused with the message index, rather than
masked approximately. A token that straddles a span edge (BPE joining the header's ``\\n`` with
leading whitespace of the content) is trained, like transformers' assistant mask does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Optional, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")
# ChatML without a default system prompt: the template of SmolLM2/Qwen minus their house prompts.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_DEFAULT_CONTROLS = {"<|im_start|>": "bos", "<|im_end|>": "eos"}
# transformers' markers for control-token text found in messages (Unicode private use, plane 15).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatFormatError(ValueError):
    """A record that cannot become a training conversation; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class ChatTemplateError(ValueError):
    """The template cannot be masked exactly (or raised an error itself while rendering)."""


@dataclass(frozen=True)
class Conversation:
    """Validated messages (``{"role", "content"}`` only) and, per message, whether it is trained."""

    messages: tuple[dict, ...]
    trainable: tuple[bool, ...]


@dataclass(frozen=True)
class ChatSample:
    """``input_ids`` (int64) and ``loss_mask`` (bool, per token: True where the token is a target)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray


def _messages(value, field: str) -> list[dict]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise ChatFormatError("wrong_type", f"{field!r} is a {type(value).__name__}, not a list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise ChatFormatError("wrong_type", f"{field}[{i}] is a {type(m).__name__}, not an object")
        if "role" not in m or "content" not in m:
            raise ChatFormatError("missing_key", f"{field}[{i}] needs 'role' and 'content' (has {sorted(m)[:6]})")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise ChatFormatError("wrong_type", f"{field}[{i}] role/content must be strings, not "
                                  f"{type(role).__name__}/{type(content).__name__}")
        if role not in ROLES:
            raise ChatFormatError("bad_role", f"{field}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    return out


def conversation_from_record(record) -> Conversation:
    """A :class:`Conversation` from ``{"messages": [...]}`` (every assistant turn trained) or
    ``{"prompt": str | messages, "completion": str | message | messages}`` (only the completion's
    assistant turns trained; a string prompt is a user turn, a string completion an assistant turn).
    Raises :class:`ChatFormatError` naming the reason (``not_an_object``, ``missing_key``,
    ``wrong_type``, ``bad_role``, ``empty``, ``no_assistant_turn``)."""
    if not isinstance(record, Mapping):
        raise ChatFormatError("not_an_object", f"a JSON {type(record).__name__}, not an object")
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
        trainable = [m["role"] == "assistant" for m in messages]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
        messages = prompt + completion
        trainable = [False] * len(prompt) + [m["role"] == "assistant" for m in completion]
    else:
        raise ChatFormatError("missing_key",
                              f"needs 'messages' or 'prompt' + 'completion' (keys: {sorted(record)[:8]})")
    if not messages:
        raise ChatFormatError("empty", "no messages")
    if not any(trainable):
        raise ChatFormatError("no_assistant_turn", "no assistant message to train on")
    for i, (m, t) in enumerate(zip(messages, trainable)):
        # An empty reply would teach the model to stop at once; almost always a broken record.
        if t and not m["content"].strip():
            raise ChatFormatError("empty", f"assistant message {i} is empty")
    return Conversation(tuple(messages), tuple(trainable))


def _template_environment():
    """transformers' chat-template sandbox (``_cached_compile_jinja_template``), replicated."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # Templates written for assistant masks wrap replies in {% generation %}; render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Refuses dunder/underscore attributes, as transformers does, so templates cannot reach internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


def _literal_text(env, template: str) -> str:
    """The template's literal strings, NUL-joined (transformers' ``_get_template_literal_text``)."""
    import jinja2.nodes

    ast = env.parse(template)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


class _ByteBackend:
    """Byte ids with character offsets, for :class:`~megatron_seed.data.tokenizer.ByteTokenizer`."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def encode(self, text: str, plain: bool) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self._tok.encode(text)
        offsets = [(i, i + 1) for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        return ids, offsets


class _HFBackend:
    """A ``tokenizers.Tokenizer`` encoding the way transformers' fast tokenizers do."""

    def __init__(self, backend):
        self._tok = backend
        # add_special_tokens=False makes the post-processor add nothing; dropping it only keeps
        # offsets untrimmed, so every character belongs to a token (the mask overlaps on offsets).
        self._tok.post_processor = None
        self._tok.encode_special_tokens = False  # template-written control tokens must match

    def encode(self, text: str, plain: bool) -> tuple[list[int], list[tuple[int, int]]]:
        if not plain:
            enc = self._tok.encode(text, add_special_tokens=False)
            return list(enc.ids), list(enc.offsets)
        # transformers' _encode_without_added_tokens: no added token, special or not, may match.
        norm = self._tok.normalizer.normalize_str(text) if self._tok.normalizer is not None else text
        splits = self._tok.pre_tokenizer.pre_tokenize_str(norm) if self._tok.pre_tokenizer else [(norm, None)]
        ids = [t.id for s, _ in splits for t in self._tok.model.tokenize(s)]
        return ids, [(0, len(text))] * len(ids)  # a plain piece lies inside one message: whole-piece offsets


class ChatTokenizer:
    """Renders and tokenizes conversations; build with :func:`load_chat_tokenizer`.

    ``pad_id``/``eos_id``/``vocab_size`` describe the vocabulary; ``identity`` is a hash of the
    vocabulary, template and control-token mapping (for cache keys)."""

    def __init__(self, backend, *, template: Optional[str], special_tokens: Mapping[str, str],
                 added_tokens: Mapping[str, tuple[int, bool]], bos_id: Optional[int], eos_id: Optional[int],
                 pad_id: Optional[int], vocab_size: int, vocab_identity: str, decode,
                 chat_control_tokens: Optional[Sequence[str]] = None):
        self._backend, self._decode = backend, decode
        self.uses_default_template = template is None
        self.template = DEFAULT_CHAT_TEMPLATE if template is None else template
        self.special_tokens = dict(special_tokens)  # template variables: bos_token, eos_token, ...
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self._env = _template_environment()
        self._compiled = self._env.from_string(self.template)
        self._added = dict(added_tokens)  # text -> (id, special)
        self._added_ids = {i for i, _ in added_tokens.values()}
        # Strings the default template writes that the vocabulary lacks: map them to bos/eos ids.
        self._extra: dict[str, int] = {}
        if self.uses_default_template:
            for text, which in _DEFAULT_CONTROLS.items():
                if text not in added_tokens:
                    token_id = bos_id if which == "bos" else eos_id
                    if token_id is None:
                        raise ChatTemplateError(f"the tokenizer has neither {text} nor a {which} token for the "
                                                "default ChatML template: pass a chat_template")
                    self._extra[text] = token_id
        # Control-token text that is sanitized in messages (transformers' _get_control_tokens).
        literal = _literal_text(self._env, self.template)
        listed = set(chat_control_tokens or ())
        controls = {t for t, (_, special) in added_tokens.items() if special or
                    (t in listed if chat_control_tokens is not None else (t in literal and not t.isspace()))}
        controls |= set(self._extra)
        self._controls_re = re.compile("|".join(map(re.escape, sorted(controls, key=len, reverse=True))) or "(?!)")
        self._markers_re = re.compile(
            f"{_MARK_START}({self._controls_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
        self._extra_re = re.compile("|".join(map(re.escape, sorted(self._extra, key=len, reverse=True))) or "(?!)")
        self._newline = backend.encode("\n", plain=False)[0]
        self.identity = hashlib.sha256(json.dumps(
            [vocab_identity, self.template, self.special_tokens, sorted(self._extra.items()), sorted(controls)]
        ).encode()).hexdigest()

    # -- rendering -------------------------------------------------------------------------------
    def _mark(self, text: str) -> str:
        text = text.replace(_MARK_START, "").replace(_MARK_END, "")
        return self._controls_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", text)

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=list(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ChatFormatError("template_error", f"the chat template refused the conversation: {e}") from e

    def render_text(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The rendered conversation as text (what transformers' ``tokenize=False`` gives)."""
        return self._render([dict(m) for m in messages], add_generation_prompt)

    # -- tokenizing ------------------------------------------------------------------------------
    def _encode_piece(self, piece: str, at: int, plain: bool, out: list) -> None:
        if not piece:
            return
        ids, offs = self._backend.encode("\n" + piece, plain) if at > 0 else ([], [])
        # transformers encodes pieces after the first behind a newline (so SentencePiece adds no
        # prefix space) and drops it again; the same here keeps our ids equal to its ids.
        n = len(self._newline)
        if at > 0 and ids[:n] == self._newline:
            ids, offs = ids[n:], [(max(s - 1, 0), max(e - 1, 0)) for s, e in offs[n:]]
        else:
            ids, offs = self._backend.encode(piece, plain)
        if plain and piece in self._added and self._added[piece][0] in ids:
            raise ChatTemplateError(f"cannot encode {piece!r} as text: the tokenizer turns it into a control token")
        for i, (s, e) in zip(ids, offs):
            out.append((i, at + s, at + e, not plain and (i in self._added_ids)))

    def _encode_marked(self, text: str) -> list[tuple[int, int, int, bool]]:
        """(id, char start, char end, is_control) per token of a marked rendering."""
        out: list[tuple[int, int, int, bool]] = []

        def normal(lo: int, hi: int) -> None:
            pos = lo
            for m in self._extra_re.finditer(text, lo, hi):
                self._encode_piece(text[pos:m.start()], pos, False, out)
                out.append((self._extra[m.group()], m.start(), m.end(), True))
                pos = m.end()
            self._encode_piece(text[pos:hi], pos, False, out)

        pos = 0
        for m in self._markers_re.finditer(text):
            normal(pos, m.start())
            if m.group(1):
                self._encode_piece(m.group(1), m.start(1), True, out)
            pos = m.end()
        normal(pos, len(text))
        return out

    def encode_conversation(self, conversation: Conversation | Sequence[Mapping],
                            train_on_all_tokens: bool = False) -> ChatSample:
        """Token ids and loss mask of a whole conversation (a plain message list trains every
        assistant turn). Raises :class:`ChatTemplateError` for a template whose prefixes are not
        stable, :class:`ChatFormatError` (``template_error``) when the template refuses the input."""
        if not isinstance(conversation, Conversation):
            conversation = conversation_from_record({"messages": list(conversation)})
        msgs = [{"role": m["role"], "content": self._mark(m["content"])} for m in conversation.messages]
        full = self._render(msgs, False)
        spans = []
        for i, trained in enumerate(conversation.trainable):
            if not trained or train_on_all_tokens:
                continue
            head, turn = self._render(msgs[:i], True), self._render(msgs[:i + 1], False)
            if not (turn.startswith(head) and full.startswith(turn)):
                raise ChatTemplateError(
                    f"message {i}: the chat template does not render conversations prefix by prefix (the text up "
                    "to this turn changes when later messages are added), so its loss mask cannot be exact; use "
                    "another template or train_on_all_tokens")
            spans.append((len(head), len(turn)))
        tokens = self._encode_marked(full)
        ids = np.fromiter((t[0] for t in tokens), dtype=np.int64, count=len(tokens))
        if train_on_all_tokens:
            return ChatSample(ids, np.ones(len(ids), dtype=bool))
        starts = np.fromiter((t[1] for t in tokens), dtype=np.int64, count=len(tokens))
        ends = np.fromiter((t[2] for t in tokens), dtype=np.int64, count=len(tokens))
        mask = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            inside = (starts < hi) & (ends > lo)
            # Train up to and including the turn's last control token (its end of turn).
            controls = [k for k in np.flatnonzero(inside) if tokens[k][3] and tokens[k][1] >= lo]
            if controls:
                hi = int(ends[controls[-1]])
                inside = (starts < hi) & (ends > lo)
            mask |= inside
        return ChatSample(ids, mask)

    def encode_prompt(self, messages: Sequence[Mapping]) -> np.ndarray:
        """Ids of a prompt ending in the assistant header (``add_generation_prompt``), for generation."""
        msgs = [{"role": m["role"], "content": self._mark(m["content"])} for m in messages]
        return np.array([t[0] for t in self._encode_marked(self._render(msgs, True))], dtype=np.int64)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    @functools.cached_property
    def end_of_turn_id(self) -> Optional[int]:
        """Where a generated assistant turn ends: the last control token the template writes for
        an assistant turn (ChatML: ``<|im_end|>``; the turn's last trained token), else ``eos_id``."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        sample = self.encode_conversation(probe)
        trained = sample.input_ids[sample.loss_mask]
        controls = self._added_ids | set(self._extra.values())
        if len(trained) and int(trained[-1]) in controls:
            return int(trained[-1])
        return self.eos_id


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _from_tokenizers(backend, template: Optional[str], special: Mapping[str, str],
                     chat_control_tokens: Optional[Sequence[str]]) -> ChatTokenizer:
    added = {t.content: (i, bool(t.special)) for i, t in backend.get_added_tokens_decoder().items()}
    ids = {k: backend.token_to_id(v) for k, v in special.items()}
    identity = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return ChatTokenizer(_HFBackend(backend), template=template, special_tokens=special, added_tokens=added,
                         bos_id=ids.get("bos_token"), eos_id=ids.get("eos_token"), pad_id=ids.get("pad_token"),
                         vocab_size=backend.get_vocab_size(with_added_tokens=True), vocab_identity=identity,
                         decode=lambda ids: backend.decode(ids, skip_special_tokens=False),
                         chat_control_tokens=chat_control_tokens)


def from_transformers(tokenizer, chat_template: Optional[str] = None) -> ChatTokenizer:
    """A :class:`ChatTokenizer` from a loaded transformers fast tokenizer (its backend is copied)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no tokenizers backend (chat rendering needs offsets)")
    template = chat_template or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return _from_tokenizers(Tokenizer.from_str(backend.to_str()), template, tokenizer.special_tokens_map,
                            getattr(tokenizer, "chat_control_tokens", None))


def load_chat_tokenizer(spec: Optional[str], chat_template: Optional[str] = None) -> ChatTokenizer:
    """``byte``/None, ``smollm2``, a ``.gguf`` file, or a directory with ``tokenizer.json`` (its
    template from ``chat_template.jinja`` or ``tokenizer_config.json``; none -> the default ChatML).
    ``chat_template`` (Jinja text or a path to a ``.jinja`` file) overrides the tokenizer's own."""
    if chat_template is not None and chat_template.endswith(".jinja") and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    if spec in (None, "", "byte"):
        from megatron_seed.data.tokenizer import ByteTokenizer

        tok = ByteTokenizer()
        return ChatTokenizer(_ByteBackend(tok), template=chat_template, special_tokens={}, added_tokens={},
                             bos_id=tok.bos, eos_id=tok.eos, pad_id=tok.pad, vocab_size=tok.vocab_size,
                             vocab_identity="byte", decode=tok.decode)
    if spec == "smollm2" or spec.endswith(".gguf"):
        from transformers import AutoTokenizer

        from megatron_seed.data.tokenizer import smollm2_gguf_path

        path = smollm2_gguf_path() if spec == "smollm2" else spec
        return from_transformers(AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                               gguf_file=os.path.basename(path)), chat_template)
    folder = os.path.dirname(spec) if spec.endswith("tokenizer.json") else spec
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(f"chat tokenizer {spec!r}: expected 'byte', 'smollm2', a .gguf file or a directory "
                                "with tokenizer.json")
    from tokenizers import Tokenizer

    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    template = chat_template
    if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if template is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: transformers uses "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    special: dict[str, str] = {}
    for source in (config, _read_json(os.path.join(folder, "special_tokens_map.json"))):
        for attr in _SPECIAL_ATTRS:
            value = source.get(attr)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and attr not in special:
                special[attr] = value
    return _from_tokenizers(Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), template, special,
                            config.get("chat_control_tokens"))
