"""SFT data: chat rendering checked against transformers' apply_chat_template on SmolLM2's tokenizer,
record reading with counts that reconcile and a reusable cache, prebuilt prefixes
(tools/preprocess_sft.py) and best-fit-decreasing packing."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from megatron_seed.data.chat import (ChatFormatError, ChatTemplateError, conversation_from_record,
                                     load_chat_tokenizer)
from megatron_seed.data.packing import (PackedSFTDataset, best_fit_decreasing, build_row, collate, plan_epoch,
                                        segment_ids_to_cu_seqlens)
from megatron_seed.data.sft_data import (SFTData, SFTDataError, SFTPrefixError, build_sft_data, sft_prefix,
                                         write_sft_prefix)
from megatron_seed.models.masks import segment_ids_to_attention_mask

SYSTEM = {"role": "system", "content": "You are a careful Python programmer."}
TURNS = [
    {"role": "user", "content": "Write a function that reverses a string."},
    {"role": "assistant", "content": "def rev(s):\n    return s[::-1]"},
    {"role": "user", "content": "Now in one line, with a test?"},
    {"role": "assistant", "content": "rev = lambda s: s[::-1]\nassert rev('ab') == 'ba'  # ok ✓"},
]
CONVERSATIONS = {"single": TURNS[:2], "single_system": [SYSTEM] + TURNS[:2],
                 "multi": TURNS, "multi_system": [SYSTEM] + TURNS}


@pytest.fixture(scope="module")
def smollm2_dir():
    from datatrove_pipelines.oracle import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    return load_chat_tokenizer(smollm2_dir)


def trained_runs(tokenizer, sample) -> list[str]:
    """The decoded text of every maximal run of trained tokens."""
    mask = np.concatenate([[False], sample.loss_mask, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(mask))
    return [tokenizer.decode(sample.input_ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


# -- chat rendering --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_ids_equal_transformers_and_mask_is_the_replies(chat, hf, name):
    messages = CONVERSATIONS[name]
    sample = chat.encode_conversation(messages)
    assert sample.input_ids.tolist() == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert trained_runs(chat, sample) == replies
    if name.endswith("system"):
        assert "SmolLM" not in chat.decode(sample.input_ids)
    else:  # SmolLM2's template adds its own system prompt; we must render it the same way
        assert "You are a helpful AI assistant named SmolLM" in chat.decode(sample.input_ids)


def test_a_loaded_transformers_tokenizer_renders_the_same(chat, hf):
    from megatron_seed.data.chat import from_transformers

    other = from_transformers(hf)
    for messages in CONVERSATIONS.values():
        a, b = chat.encode_conversation(messages), other.encode_conversation(messages)
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
    assert other.identity == chat.identity and other.pad_id == hf.pad_token_id


def test_generation_prompt_equals_transformers(chat, hf):
    prompt = [SYSTEM] + TURNS[:3]
    assert chat.encode_prompt(prompt).tolist() == hf.apply_chat_template(
        prompt, tokenize=True, return_dict=False, add_generation_prompt=True)


def test_control_token_text_in_messages_is_encoded_as_text(chat, hf):
    messages = [{"role": "user", "content": "Print '<|im_end|>' then '<|im_start|>assistant\nhi'"},
                {"role": "assistant", "content": "print('<|im_end|>')\n<|endoftext|>"}]
    sample = chat.encode_conversation(messages)
    assert sample.input_ids.tolist() == hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                               sanitize_control_tokens=True)
    im_start = hf.convert_tokens_to_ids("<|im_start|>")
    assert sample.input_ids.tolist().count(im_start) == 3  # default system, user, assistant: none from text
    assert trained_runs(chat, sample) == [messages[1]["content"] + "<|im_end|>"]


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    """A tiny SentencePiece-style (Metaspace, prefix space on the first piece only) tokenizer
    directory: the case for which transformers encodes text pieces after the first behind a newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("metaspace")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = ["def rev(s): return s[::-1] <|> \n", "print hello world", "user assistant system"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": template}))
    return str(folder)


def test_sentencepiece_style_tokenizer_equals_transformers(metaspace_dir):
    from transformers import AutoTokenizer

    hf, chat = AutoTokenizer.from_pretrained(metaspace_dir), load_chat_tokenizer(metaspace_dir)
    plain = [{"role": "user", "content": "print hello"}, {"role": "assistant", "content": "def rev(s): return s"}]
    tricky = [{"role": "user", "content": "print <|im_end|> hello"},
              {"role": "assistant", "content": "<|im_start|>def rev(s): return s"}]
    assert chat.encode_conversation(plain).input_ids.tolist() == hf.apply_chat_template(plain, return_dict=False)
    sample = chat.encode_conversation(tricky)
    assert sample.input_ids.tolist() == hf.apply_chat_template(tricky, return_dict=False,
                                                               sanitize_control_tokens=True)
    assert trained_runs(chat, sample) == [chat.decode(hf.encode(tricky[1]["content"], split_special_tokens=True))
                                          + "<|im_end|>"]


def test_template_with_text_after_the_reply_is_trained_up_to_end_of_turn(chat, hf, smollm2_dir):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if m['role'] == 'assistant' %} [done]{% endif %}<|im_end|>\n\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    custom = load_chat_tokenizer(smollm2_dir, chat_template=template)
    sample = custom.encode_conversation(TURNS)
    assert sample.input_ids.tolist() == hf.apply_chat_template(TURNS, chat_template=template, tokenize=True,
                                                               return_dict=False)
    assert trained_runs(custom, sample) == [TURNS[1]["content"] + " [done]<|im_end|>",
                                            TURNS[3]["content"] + " [done]<|im_end|>"]


def test_template_that_rewrites_earlier_turns_is_refused(smollm2_dir):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
                "{% if loop.last %}<|endoftext|>{% endif %}\n{% endfor %}")
    custom = load_chat_tokenizer(smollm2_dir, chat_template=template)
    with pytest.raises(ChatTemplateError, match="message 1"):
        custom.encode_conversation(TURNS)
    assert custom.encode_conversation(TURNS, train_on_all_tokens=True).loss_mask.all()


def test_prompt_completion_records(chat):
    as_messages = chat.encode_conversation(TURNS[:2])
    record = {"prompt": TURNS[0]["content"], "completion": TURNS[1]["content"]}
    as_pair = chat.encode_conversation(conversation_from_record(record))
    assert as_pair.input_ids.tolist() == as_messages.input_ids.tolist()
    assert as_pair.loss_mask.tolist() == as_messages.loss_mask.tolist()
    # A conversational prompt may hold earlier assistant turns: only the completion is trained.
    record = {"prompt": TURNS[:3], "completion": TURNS[3]}
    sample = chat.encode_conversation(conversation_from_record(record))
    assert sample.input_ids.tolist() == chat.encode_conversation(TURNS).input_ids.tolist()
    assert trained_runs(chat, sample) == [TURNS[3]["content"] + "<|im_end|>"]
    everything = chat.encode_conversation(conversation_from_record(record), train_on_all_tokens=True)
    assert everything.loss_mask.all() and len(everything.loss_mask) == len(sample.input_ids)


def test_default_chatml_on_the_byte_tokenizer():
    from megatron_seed.data.tokenizer import ByteTokenizer

    byte, chat = ByteTokenizer(), load_chat_tokenizer("byte")
    assert chat.uses_default_template
    messages = [SYSTEM] + TURNS + [{"role": "user", "content": "<|im_start|>"}, {"role": "assistant", "content": "é"}]
    # ChatML with the vocabulary's bos/eos as <|im_start|>/<|im_end|>, built by hand.
    want_ids, want_mask = [], []
    for m in messages:
        header, body = byte.encode(m["role"] + "\n"), byte.encode(m["content"]) + [byte.eos]
        trained = m["role"] == "assistant"
        want_ids += [byte.bos] + header + body + byte.encode("\n")
        want_mask += [False] * (1 + len(header)) + [trained] * len(body) + [False]
    sample = chat.encode_conversation(messages)
    assert sample.input_ids.tolist() == want_ids
    assert sample.loss_mask.tolist() == want_mask


@pytest.mark.parametrize("record, reason", [
    ([1, 2], "not_an_object"),
    ({"text": "x"}, "missing_key"),
    ({"prompt": "x"}, "missing_key"),
    ({"messages": "hi"}, "wrong_type"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "wrong_type"),
    ({"messages": [{"role": "user"}]}, "missing_key"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}, "bad_role"),
    ({"messages": []}, "empty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    ({"prompt": TURNS[:2], "completion": {"role": "user", "content": "y"}}, "no_assistant_turn"),
])
def test_bad_records_name_their_reason(record, reason):
    with pytest.raises(ChatFormatError) as e:
        conversation_from_record(record)
    assert e.value.reason == reason


# -- reading and caching ----------------------------------------------------------------------------

def good(i: int, reply_len: int = 10) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i} " + "x" * reply_len}]}


def write_inputs(tmp_path):
    lines = [json.dumps(good(0)), "{not json", json.dumps([1]), json.dumps({"text": "x"}),
             "", json.dumps({"messages": [{"role": "user", "content": 5}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
             json.dumps(good(1, reply_len=500)), json.dumps({"prompt": "p", "completion": "c"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(json.dumps(good(2)).encode() + b"\n" + b'{"messages": "\xff"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([good(3), {"messages": [], "prompt": None, "completion": None}]),
                   tmp_path / "c.parquet")


def test_reading_counts_reconcile_and_name_file_and_line(tmp_path):
    write_inputs(tmp_path)
    chat = load_chat_tokenizer("byte")
    data = build_sft_data([str(tmp_path / "*.jsonl*"), str(tmp_path / "c.parquet")], chat,
                          str(tmp_path / "cache"), seq_length=200)
    s = data.summary
    assert s.skipped == {"invalid_json": 1, "invalid_utf8": 1, "not_an_object": 1, "missing_key": 1, "wrong_type": 1,
                         "no_assistant_turn": 1, "too_long": 1, "empty": 1}
    assert (s.records_in, s.written) == (12, 4) and s.records_in == s.written + s.skipped_total
    with open(os.path.join(data.path, "skipped.jsonl")) as f:
        skipped = [json.loads(line) for line in f]
    assert [(os.path.basename(r["file"]), r.get("line", r.get("row")), r["reason"]) for r in skipped] == [
        ("a.jsonl", 2, "invalid_json"), ("a.jsonl", 3, "not_an_object"), ("a.jsonl", 4, "missing_key"),
        ("a.jsonl", 6, "wrong_type"), ("a.jsonl", 7, "no_assistant_turn"), ("a.jsonl", 8, "too_long"),
        ("b.jsonl.gz", 2, "invalid_utf8"), ("c.parquet", 1, "empty")]
    records = [good(0), {"prompt": "p", "completion": "c"}, good(2), good(3)]
    assert len(data) == 4 and s.tokens == int(data.lengths.sum())
    for i, record in enumerate(records):
        want = chat.encode_conversation(conversation_from_record(record))
        ids, mask = data.sample(i)
        assert ids.tolist() == want.input_ids.tolist() and mask.tolist() == want.loss_mask.tolist()


def test_truncate_keeps_the_head_and_counts_it(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(good(0, reply_len=500)) + "\n" + json.dumps(good(1)) + "\n")
    chat = load_chat_tokenizer("byte")
    data = build_sft_data(str(tmp_path / "a.jsonl"), chat, str(tmp_path / "cache"), 64, overflow="truncate")
    assert (data.summary.written, data.summary.truncated, data.summary.skipped) == (2, 1, {})
    full = chat.encode_conversation(conversation_from_record(good(0, reply_len=500)))
    ids, mask = data.sample(0)
    assert ids.tolist() == full.input_ids[:64].tolist() and mask.tolist() == full.loss_mask[:64].tolist()
    # A prompt alone longer than seq_length leaves nothing to train: dropped after all, counted.
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "q" * 100, "completion": "a"}) + "\n"
                                      + json.dumps(good(1)) + "\n")
    data = build_sft_data(str(tmp_path / "b.jsonl"), chat, str(tmp_path / "cache"), 64, overflow="truncate")
    assert data.summary.skipped == {"no_loss_after_truncation": 1} and data.summary.written == 1


def test_cache_is_reused_and_keyed_by_inputs_and_options(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    chat, cache = load_chat_tokenizer("byte"), str(tmp_path / "cache")
    first = build_sft_data(str(path), chat, cache, 128)
    again = build_sft_data(str(path), chat, cache, 128)
    assert (first.from_cache, again.from_cache, again.path) == (False, True, first.path)
    assert again.summary == first.summary
    other_options = build_sft_data(str(path), chat, cache, 128, train_on_all_tokens=True)
    assert not other_options.from_cache and other_options.path != first.path
    assert other_options.sample(0)[1].all()
    path.write_text(json.dumps(good(0)) + "\n" + json.dumps(good(1)) + "\n")
    changed = build_sft_data(str(path), chat, cache, 128)
    assert not changed.from_cache and changed.path != first.path and len(changed) == 2
    assert sorted(p for p in os.listdir(cache) if ".tmp" in p) == []  # builds are renamed into place


def test_strict_stops_at_the_first_bad_record_naming_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(good(0)) + "\n\n[1]\n")
    with pytest.raises(SFTDataError, match=r"a\.jsonl:3: not_an_object"):
        build_sft_data(str(tmp_path / "a.jsonl"), load_chat_tokenizer("byte"), str(tmp_path / "c"), 128, strict=True)
    with pytest.raises(SFTDataError, match="no SFT sample survived"):
        build_sft_data(str(tmp_path / "a.jsonl"), load_chat_tokenizer("byte"), str(tmp_path / "c"), 8)


# -- prebuilt prefixes (tools/preprocess_sft.py) ------------------------------------------------------

def preprocess_sft(*args: str) -> int:
    from megatron_seed.data.preprocess_sft import main

    return main(list(args))


def make_prefix(tmp_path, seq_length=200, *extra: str) -> str:
    write_inputs(tmp_path)
    prefix = str(tmp_path / "out" / "sft")
    assert preprocess_sft("--input", str(tmp_path / "*.jsonl*"), str(tmp_path / "c.parquet"), "--output-prefix",
                          prefix, "--tokenizer-model", "byte", "--seq-length", str(seq_length), *extra) == 0
    return prefix


def test_prefix_tool_writes_the_caches_samples_and_counts(tmp_path, capsys):
    prefix = make_prefix(tmp_path)
    assert "records in 12 = written 4 + skipped 8" in capsys.readouterr().err
    chat = load_chat_tokenizer("byte")
    cache = build_sft_data([str(tmp_path / "*.jsonl*"), str(tmp_path / "c.parquet")], chat,
                           str(tmp_path / "cache"), seq_length=200)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"sft_{n}" for n in ("tokens.bin", "tokens.idx", "loss_mask.bin", "loss_mask.idx", "summary.json",
                             "skipped.jsonl"))
    built = SFTData(prefix)
    assert len(built) == len(cache) == 4 and built.lengths.tolist() == cache.lengths.tolist()
    for i in range(len(cache)):
        (ids, mask), (want_ids, want_mask) = built.sample(i), cache.sample(i)
        assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()
    s = built.summary
    assert s.records_in == s.written + s.skipped_total == 12 and s.skipped["too_long"] == 1
    assert (s.skipped, s.written, s.tokens, s.loss_tokens) == (cache.summary.skipped, cache.summary.written,
                                                               cache.summary.tokens, cache.summary.loss_tokens)
    with open(prefix + "_skipped.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    reasons = {}
    for r in skipped:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    assert reasons == s.skipped
    with open(os.path.join(cache.path, "skipped.jsonl")) as f:
        assert [json.loads(line) for line in f] == skipped
    assert (s.seq_length, s.overflow, s.train_on_all_tokens) == (200, "drop", False)
    assert (s.tokenizer, s.tokenizer_spec, s.longest) == (chat.identity, "byte", int(built.lengths.max()))


def test_prefix_is_read_by_build_sft_data_and_the_sft_objective(tmp_path):
    from types import SimpleNamespace

    from megatron_seed.config.schema import ConfigError, DataConfig
    from megatron_seed.training.objectives.sft import build_sft_objective

    prefix = make_prefix(tmp_path)
    assert sft_prefix(prefix) == prefix and sft_prefix(str(tmp_path / "a.jsonl")) is None
    chat, cache = load_chat_tokenizer("byte"), str(tmp_path / "cache")
    data = build_sft_data([prefix], chat, cache, 256)
    assert (data.path, data.from_cache, len(data)) == (prefix, True, 4)

    def objective(**data_options):
        d = DataConfig(train=prefix, valid=prefix, tokenizer="byte", cache_dir=cache, seq_length=256)
        for k, v in data_options.items():
            setattr(d, k, v)
        run = SimpleNamespace(data=d, train=SimpleNamespace(seed=1, micro_batch_size=1),
                              model=SimpleNamespace(vocab_size=chat.vocab_size, transformer_impl="local"))
        ctx = SimpleNamespace(rank=0, is_main=False, dp_rank=0, dp=1, device=torch.device("cpu"))
        return build_sft_objective(run, ctx, None)  # no process group: a prefix needs no barrier

    train, valid = objective().datasets
    assert train.data.path == valid.data.path == prefix
    rows = [train.row(0, i) for i in range(train.num_rows(0))]
    assert sum(float(r["loss_mask"].sum()) for r in rows) == sum(int(data.sample(i)[1][1:].sum())
                                                                 for i in range(len(data)))
    assert not os.path.exists(cache)  # opened, not tokenized again
    with pytest.raises(ConfigError, match=f"SFT prefix {prefix} .*data.train_on_all_tokens=true"):
        objective(train_on_all_tokens=True)


def test_prefix_that_does_not_fit_the_run_is_refused_naming_it(tmp_path, metaspace_dir):
    from megatron_seed.config.schema import ConfigError
    from megatron_seed.data.chat import DEFAULT_CHAT_TEMPLATE

    prefix = make_prefix(tmp_path)
    chat, cache = load_chat_tokenizer("byte"), str(tmp_path / "cache")
    longest = SFTData(prefix).summary.longest
    assert build_sft_data(prefix, chat, cache, longest).summary.written == 4  # exactly long enough: fine
    other_template = load_chat_tokenizer("byte", chat_template=DEFAULT_CHAT_TEMPLATE + "{# edited #}")
    other_vocab = load_chat_tokenizer(metaspace_dir, chat_template=DEFAULT_CHAT_TEMPLATE)
    refused = [
        (dict(tokenizer=other_template), "another chat tokenizer .*--tokenizer-model byte.*chat template differs"),
        (dict(tokenizer=other_vocab), "another chat tokenizer .*vocabulary or control tokens differ"),
        (dict(seq_length=longest - 1), f"up to {longest} tokens .*data.seq_length={longest - 1}.*"
                                       f"data.seq_length>={longest}"),
        (dict(train_on_all_tokens=True), "train_on_all_tokens=false, this run has data.train_on_all_tokens=true.*"
                                         "Set data.train_on_all_tokens=false"),
    ]
    for change, message in refused:
        options = {"tokenizer": chat, "seq_length": 256, "train_on_all_tokens": False, **change}
        with pytest.raises(SFTPrefixError, match=f"SFT prefix {prefix} .*{message}") as e:
            build_sft_data(prefix, options["tokenizer"], cache, options["seq_length"],
                           train_on_all_tokens=options["train_on_all_tokens"])
        assert isinstance(e.value, ConfigError)
    assert not os.path.exists(cache)


def test_interrupted_prefix_write_leaves_no_summary(tmp_path, monkeypatch):
    from megatron_seed.data.chat import ChatTokenizer

    write_inputs(tmp_path)
    chat, prefix, out = load_chat_tokenizer("byte"), str(tmp_path / "out" / "sft"), tmp_path / "out"
    encode, calls = ChatTokenizer.encode_conversation, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ChatTokenizer, "encode_conversation", failing)
        with pytest.raises(KeyboardInterrupt):
            write_sft_prefix(str(tmp_path / "*.jsonl*"), chat, prefix, 200)
    assert len(calls) == 3 and os.listdir(out) == []  # neither final nor temporary files
    write_sft_prefix(str(tmp_path / "*.jsonl*"), chat, prefix, 200)
    assert sft_prefix(prefix) == prefix
    # A rebuild stopped while renaming its files into place: the old summary is gone first.
    replace = os.replace

    def failing_replace(src, dst):
        if dst == prefix + "_tokens.idx":
            raise OSError("disk gone")
        return replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="disk gone"):
            write_sft_prefix(str(tmp_path / "*.jsonl*"), chat, prefix, 100)
    assert not os.path.exists(prefix + "_summary.json") and sft_prefix(prefix) is None
    assert [p for p in os.listdir(out) if ".tmp" in p] == []


def test_preprocess_sft_tool_fails_when_nothing_survives(tmp_path):
    import sys

    from helpers import run_cli

    (tmp_path / "a.jsonl").write_text(json.dumps(good(0)) + "\n[1]\n")
    prefix = str(tmp_path / "sft")
    proc = run_cli([sys.executable, "tools/preprocess_sft.py", "--input", str(tmp_path / "a.jsonl"),
                    "--output-prefix", prefix, "--tokenizer-model", "byte", "--seq-length", "8"], timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "no SFT sample survived (records in 2 = written 0 + skipped 2 (not_an_object 1, too_long 1)" in proc.stderr
    assert prefix + "_skipped.jsonl" in proc.stderr and not os.path.exists(prefix + "_summary.json")
    with open(prefix + "_skipped.jsonl") as f:
        assert [json.loads(line)["reason"] for line in f] == ["too_long", "not_an_object"]
    assert preprocess_sft("--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path) + "/",
                          "--tokenizer-model", "byte", "--seq-length", "64") == 1  # a directory is no prefix


# -- packing -------------------------------------------------------------------------------------

def test_every_sample_once_per_epoch_and_rows_fit():
    lengths = np.random.default_rng(0).integers(1, 300, size=500)
    plans = [plan_epoch(lengths, 512, seed=7, epoch=e) for e in range(3)]
    for plan in plans:
        placed = np.concatenate(plan.rows)
        assert sorted(placed.tolist()) == list(range(500))
        assert max(int(lengths[r].sum()) for r in plan.rows) <= 512
        assert plan.efficiency == int(lengths.sum()) / (plan.num_rows * 512)
        assert plan.efficiency > 0.97  # BFD on many small items leaves little room
        longest = lengths[[int(r[0]) for r in plan.rows]]  # BFD makes rows longest-first: shuffled after
        assert (np.diff(longest) > 0).any()
    again = plan_epoch(lengths, 512, seed=7, epoch=0)
    assert [r.tolist() for r in again.rows] == [r.tolist() for r in plans[0].rows]
    assert [r.tolist() for r in plans[1].rows] != [r.tolist() for r in plans[0].rows]
    unpacked = plan_epoch(lengths, 512, seed=7, epoch=0, packing=False)
    assert all(len(r) == 1 for r in unpacked.rows)
    assert sorted(np.concatenate(unpacked.rows).tolist()) == list(range(500))
    with pytest.raises(ValueError, match="more than a row"):
        plan_epoch([10, 600], 512, seed=0, epoch=0)


def first_fit(lengths, capacity):
    rows, room = [], []
    for i, n in enumerate(lengths):
        k = next((k for k, r in enumerate(room) if r >= n), None)
        if k is None:
            rows.append([]), room.append(capacity)
            k = len(rows) - 1
        rows[k].append(i)
        room[k] -= n
    return rows


def test_best_fit_decreasing_beats_first_fit():
    lengths = [3, 3, 3, 3, 7, 7, 7, 7]  # arrival order: first fit packs the 3s together, then 7s alone
    assert len(first_fit(lengths, 10)) == 5
    bins = best_fit_decreasing(lengths, 10)
    assert len(bins) == 4 and all(sum(lengths[i] for i in b) == 10 for b in bins)
    # Best fit (not first fit) among open rows: the 2 goes to the row with 2 free, not the one with 5.
    assert best_fit_decreasing([5, 8, 2], 10) == [[1, 2], [0]]


def make_samples(rng, lengths):
    return [(rng.integers(10, 1000, size=n), rng.random(n) < 0.5) for n in lengths]


def test_row_labels_masks_positions_and_segments():
    rng = np.random.default_rng(1)
    samples = make_samples(rng, [5, 1, 7])
    row = build_row(samples, 16, pad_id=3)
    t = 0
    for k, (ids, mask) in enumerate(samples, start=1):
        for j in range(len(ids)):
            assert row["tokens"][t] == ids[j] and row["position_ids"][t] == j and row["segment_ids"][t] == k
            last = j == len(ids) - 1
            assert row["labels"][t] == (3 if last else ids[j + 1])  # never the next sample's token
            assert row["loss_mask"][t] == (0.0 if last else float(mask[j + 1]))
            t += 1
    assert t == 13
    assert row["tokens"][13:].tolist() == [3] * 3 and row["loss_mask"][13:].tolist() == [0.0] * 3
    assert row["segment_ids"][13:].tolist() == [0] * 3 and row["position_ids"][13:].tolist() == [0, 1, 2]


def test_attention_mask_is_block_diagonal_causal_and_cu_seqlens_match():
    rng = np.random.default_rng(2)
    rows = [build_row(make_samples(rng, [3, 4]), 9, 0), build_row(make_samples(rng, [9]), 9, 0)]
    batch = collate(rows)
    masked = segment_ids_to_attention_mask(batch["segment_ids"])
    assert masked.shape == (2, 1, 9, 9) and masked.dtype == torch.bool
    for b in range(2):
        seg = batch["segment_ids"][b].tolist()
        for q in range(9):
            for k in range(9):
                assert bool(masked[b, 0, q, k]) == (not (k <= q and seg[k] == seg[q]))
    cu, max_len = segment_ids_to_cu_seqlens(batch["segment_ids"])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 9, 18] and max_len == 9


def test_packed_dataset_covers_every_trained_token_once(tmp_path):
    records = [good(i, reply_len=int(n)) for i, n in enumerate(np.random.default_rng(3).integers(1, 90, 40))]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    chat = load_chat_tokenizer("byte")
    data = build_sft_data(str(tmp_path / "a.jsonl"), chat, str(tmp_path / "cache"), 128)
    want = sum(int(data.sample(i)[1][1:].sum()) for i in range(len(data)))
    for packing in (True, False):
        packed = PackedSFTDataset(data, 128, chat.pad_id, seed=5, packing=packing)
        rows = [packed.row(1, i) for i in range(packed.num_rows(1))]
        assert sum(float(r["loss_mask"].sum()) for r in rows) == want
        assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == int(data.lengths.sum())
    assert PackedSFTDataset(data, 128, chat.pad_id, seed=5).num_rows(0) < len(data)
