"""Fill-in-the-middle in Seed-Coder's SPM layout, with character-level split points.

A document chosen for FIM (probability ``rate``) is cut at two uniformly random *character*
positions into prefix / middle / suffix and becomes

    <[fim-suffix]> SUFFIX <[fim-prefix]> PREFIX <[fim-middle]> MIDDLE

(then EOD, as any document). Each part is tokenized on its own, so no token straddles a cut.

Where it happens: at preprocessing. Character-level cuts need the text, which only preprocessing
has; at sample time the dataset holds token ids, and cutting there would either be token-level
(not what Seed-Coder trains on) or cost a decode + re-encode per sample inside the training loop.
The price is that a document keeps the same cut in every epoch; code pretraining runs see most
data about once, and a different ``--fim-seed`` per epoch-shard restores variety when wanted.
The choice is deterministic in (seed, global record index), so it does not depend on the number
of workers or on chunking.
"""

from __future__ import annotations

import random
from typing import Sequence


def fim_rng(seed: int, index: int) -> random.Random:
    # String seeds hash with SHA-512 inside Random: stable across processes and Python runs.
    return random.Random(f"fim:{seed}:{index}")


def split_points(text: str, rng: random.Random) -> tuple[str, str, str]:
    """(prefix, middle, suffix) at two uniform character positions in ``[0, len(text)]``."""
    a, b = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:a], text[a:b], text[b:]


def encode_with_fim(texts: Sequence[str], indices: Sequence[int], tokenizer, rate: float, seed: int,
                    num_threads: int = 1) -> list[list[int]]:
    """Token ids of each text, FIM-transformed (SPM) with probability ``rate``."""
    if rate <= 0:
        return tokenizer.encode_batch(texts, num_threads=num_threads)
    ids = (tokenizer.fim_suffix, tokenizer.fim_prefix, tokenizer.fim_middle)
    if any(i is None for i in ids):
        raise ValueError(f"FIM needs <[fim-suffix]>/<[fim-prefix]>/<[fim-middle]> (or StarCoder's "
                         f"<fim_*>) in the vocabulary of {tokenizer.name}; use --fim-rate 0")
    pieces: list[str] = []
    layout: list[int] = []  # 1 = plain (one piece), 3 = FIM (suffix, prefix, middle)
    for text, index in zip(texts, indices):
        rng = fim_rng(seed, index)
        if rng.random() < rate:
            prefix, middle, suffix = split_points(text, rng)
            pieces += [suffix, prefix, middle]
            layout.append(3)
        else:
            pieces.append(text)
            layout.append(1)
    encoded = tokenizer.encode_batch(pieces, num_threads=num_threads)
    out, pos = [], 0
    for kind in layout:
        if kind == 1:
            out.append(encoded[pos])
        else:
            suffix, prefix, middle = encoded[pos:pos + 3]
            out.append([ids[0], *suffix, ids[1], *prefix, ids[2], *middle])
        pos += kind
    return out


def reassemble(ids: Sequence[int], tokenizer) -> str:
    """The original document back from a (possibly) FIM-transformed token sequence."""
    ids = list(ids)
    if ids and ids[0] == tokenizer.fim_suffix:
        p, m = ids.index(tokenizer.fim_prefix), ids.index(tokenizer.fim_middle)
        suffix, prefix, middle = ids[1:p], ids[p + 1:m], ids[m + 1:]
        return tokenizer.decode(prefix) + tokenizer.decode(middle) + tokenizer.decode(suffix)
    return tokenizer.decode(ids)

