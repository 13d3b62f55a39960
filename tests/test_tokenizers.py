"""Tokenizer training, loading, exact round trips, transformers compatibility, the tiktoken engine."""

from __future__ import annotations

import json

import pytest

from megatron_seed.data import stdlib_corpus, tokenizer_training
from megatron_seed.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

TRICKY = ("def f(x):\r\n\treturn x  \t \n\n\n# ünïcödé 日本語 🐍 \u200b\r\n"
          "s = '<[fim-middle]>'  # special-token text inside code stays text\n   \n\x00\x7f end")


@pytest.fixture(scope="module")
def corpus_texts():
    return [p.read_text(encoding="utf-8") for p in stdlib_corpus.stdlib_files(120)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus_texts):
    out = tmp_path_factory.mktemp("bpe")
    tokenizer_training.train_bpe(iter(corpus_texts), 3000, str(out))
    return out


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, corpus_texts):
    out = tmp_path_factory.mktemp("spm")
    tokenizer_training.train_sentencepiece(iter(corpus_texts), 3000, str(out))
    return out


def test_trained_bpe_has_seed_coder_specials_and_round_trips(bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    assert tok.vocab_size == 3000
    assert (tok.bos, tok.pad, tok.eos) == (0, 1, 2)
    assert (tok.fim_suffix, tok.fim_prefix, tok.fim_middle) == (3, 4, 5)
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))  # text never becomes control ids
    assert tok.engine == "tiktoken"


def test_trained_sentencepiece_round_trips(spm_dir):
    tok = load_tokenizer(str(spm_dir))
    assert (tok.bos, tok.pad, tok.eos) == (0, 1, 2)
    assert None not in (tok.fim_suffix, tok.fim_prefix, tok.fim_middle)
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY
    assert tok.fim_middle not in ids


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_output_loads_in_transformers_with_identical_ids(kind, bpe_dir, spm_dir, corpus_texts):
    from transformers import AutoTokenizer

    folder = str(bpe_dir if kind == "bpe" else spm_dir)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    plain = TRICKY.replace("<[fim-middle]>", "fim")  # transformers maps special-token text to ids
    for text in [plain, *corpus_texts[:20]]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text)
        assert hf.decode(ids) == text
    assert hf.convert_tokens_to_ids(SPECIAL_TOKENS[5]) == ours.fim_middle
    assert hf.eos_token_id == ours.eos


def test_tiktoken_engine_equals_tokenizers_on_the_standard_library(bpe_dir):
    fast = load_tokenizer(str(bpe_dir))
    reference = load_tokenizer(str(bpe_dir), engine="hf")
    assert (fast.engine, reference.engine) == ("tiktoken", "hf")
    texts = [p.read_text(encoding="utf-8") for p in stdlib_corpus.stdlib_files(0)]
    assert len(texts) > 800
    assert fast.encode_batch(texts, num_threads=2) == reference.encode_batch(texts)


def test_tiktoken_engine_refuses_tokenizers_it_cannot_reproduce(bpe_dir, tmp_path):
    spec = json.loads((bpe_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(tmp_path))
    assert tok.engine == "hf" and "normalizer" in tok.fast_engine_unavailable_because
    with pytest.raises(ValueError, match="tiktoken engine"):
        load_tokenizer(str(tmp_path), engine="tiktoken")


def test_smollm2_tokenizer_from_its_gguf_matches_transformers(corpus_texts):
    import os

    from transformers import AutoTokenizer

    from megatron_seed.data.tokenizer import smollm2_gguf_path

    path = smollm2_gguf_path()
    tok = load_tokenizer("smollm2")
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert tok.vocab_size == 49152
    assert tok.eos == hf.eos_token_id
    for text in corpus_texts[:10]:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


def test_unknown_tokenizer_spec_names_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
