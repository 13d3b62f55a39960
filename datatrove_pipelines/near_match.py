"""MinHash near matching of files against benchmark solutions, for decontamination.

An exact 10-gram misses a solution whose variables were renamed and whose lines were shuffled:
a rename every few words leaves no 10 words in a row intact. Two choices make such copies
visible while ordinary code sharing idioms stays apart:

* **identifier-blind words**: the decontamination's words (identifiers and numbers), with every
  identifier that is not a keyword or a Python builtin replaced by ``_``. A consistent rename then
  changes nothing; what is left is the shape of the code plus its literals (numbers), which is
  what a copied solution keeps. 5-gram shingles of these words, as a set.
* **windows**: a file is far longer than a benchmark solution, and the Jaccard similarity of a
  whole file with a solution says nothing. Each file is cut into overlapping windows of the sizes
  the benchmark items have (a ladder of sizes, x1.25 apart, offset by 1/8 of their size), and
  each window is compared with the items.

Signatures: 128 multiply-shift hashes (numpy, 64-bit) of blake2b shingle hashes. Candidates come
from LSH (32 bands of 4 rows: a pair at Jaccard 0.7 shares a band with probability > 0.999), and
a candidate is a match when the fraction of equal minhashes (the Jaccard estimate) is at least
the threshold. Items with fewer than ``min_shingles`` shingles (one-line solutions) are too
generic to match on shape and are left to the exact check.
"""

from __future__ import annotations

import builtins
import hashlib
import keyword
import numpy as np

from datatrove_pipelines.decontamination import WORDS

# Keywords of the languages the corpus holds, and Python's builtins: words that carry structure
# rather than naming something the author chose.
KEEP = frozenset(keyword.kwlist + [k for k in dir(builtins) if k.islower() and not k.startswith("_")] + """
    self this super new delete null nullptr true false void int long short char float double bool
    boolean byte unsigned signed const static final public private protected var let function func
    fn struct enum interface extends implements package import include template typename auto
    switch case default do goto sizeof typeof instanceof throw throws catch try string String
    vector map std cout cin endl printf malloc free match impl mut pub use mod loop go chan defer
    select range len make append echo then fi done esac elif until local export""".split())


def normalized_words(text: str) -> list[str]:
    return [w if w in KEEP or w[0].isdigit() else "_" for w in WORDS.findall(text)]


class MinHasher:
    def __init__(self, num_hashes: int = 128, bands: int = 32, shingle: int = 5, seed: int = 1):
        if num_hashes % bands:
            raise ValueError("num_hashes must be a multiple of bands")
        self.shingle, self.bands, self.rows = shingle, bands, num_hashes // bands
        rng = np.random.RandomState(seed)
        # Odd multipliers: multiply-shift is a universal family only with odd a.
        self.a = (rng.randint(0, 2 ** 62, num_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
        self.b = rng.randint(0, 2 ** 62, num_hashes, dtype=np.uint64)

    def shingle_hashes(self, words: list[str]) -> np.ndarray:
        """One (num_hashes,) row of permuted hashes per shingle position, in text order."""
        k = self.shingle
        grams = [" ".join(words[i:i + k]) for i in range(len(words) - k + 1)]
        if not grams:
            return np.zeros((0, len(self.a)), dtype=np.uint64)
        x = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                      for g in grams], dtype=np.uint64)
        with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
            return (x[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, num_hashes) signatures -> (n, bands) keys, each mixing the band's rows into one
        64-bit word (vectorised: a file has hundreds of windows)."""
        rows = signatures.reshape(len(signatures), self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (rows * self.a[:self.rows]).sum(axis=-1, dtype=np.uint64)


class NearMatchIndex:
    """Benchmark items' signatures in LSH bands; ``match(text)`` finds the best item a window of
    the text nearly copies."""

    def __init__(self, items: list[tuple[str, str, str]], threshold: float = 0.7, min_shingles: int = 20,
                 hasher: MinHasher | None = None):
        """``items``: (benchmark, item id, solution text)."""
        self.threshold = threshold
        self.hasher = hasher or MinHasher()
        self.items, signatures, sizes = [], [], []
        for benchmark, item_id, text in items:
            hashes = self.hasher.shingle_hashes(normalized_words(text))
            distinct = len(np.unique(hashes[:, 0])) if len(hashes) else 0
            if distinct < min_shingles:
                continue
            self.items.append((benchmark, item_id))
            signatures.append(hashes.min(axis=0))
            sizes.append(len(hashes))
        self.signatures = np.array(signatures, dtype=np.uint64).reshape(len(signatures), -1)
        self.item_keys = self.hasher.band_keys(self.signatures)
        # Window sizes (in shingles) covering every item size within the Jaccard bound: a window
        # of w shingles and an item of s reach Jaccard t only if t <= w/s <= 1/t.
        self.window_sizes = []
        if sizes:
            w, top = max(8.0, min(sizes) * threshold), max(sizes) / max(threshold, 0.1)
            while w <= top * 1.25:
                self.window_sizes.append(int(round(w)))
                w *= 1.25

    def window_signatures(self, hashes: np.ndarray) -> np.ndarray:
        n, out = len(hashes), []
        for size in self.window_sizes:
            if n <= size:
                out.append(hashes.min(axis=0, keepdims=True))
                break  # larger windows would all be the whole text
            step = max(1, size // 8)
            blocks = np.minimum.reduceat(hashes, np.arange(0, n, step), axis=0)
            span = max(1, size // step)
            count = max(1, len(blocks) - span + 1)
            windows = blocks[:count].copy()
            for j in range(1, min(span, len(blocks))):  # window k = min of blocks k .. k+span-1
                windows = np.minimum(windows, blocks[j:j + count])
            out.append(windows)
        return np.concatenate(out) if out else np.zeros((0, len(self.hasher.a)), dtype=np.uint64)

    def match(self, text: str) -> tuple[str, str, float] | None:
        """(benchmark, item id, estimated Jaccard) of the closest item at or above the threshold."""
        if not self.items:
            return None
        hashes = self.hasher.shingle_hashes(normalized_words(text))
        if not len(hashes):
            return None
        windows = self.window_signatures(hashes)
        keys = self.hasher.band_keys(windows)
        candidate = np.zeros(len(windows), dtype=bool)
        for band in range(self.hasher.bands):
            candidate |= np.isin(keys[:, band], self.item_keys[:, band])
        best, best_item = self.threshold, None
        for signature in windows[candidate]:
            estimates = (self.signatures == signature).mean(axis=1)
            i = int(np.argmax(estimates))
            if estimates[i] >= best:
                best, best_item = float(estimates[i]), i
        if best_item is None:
            return None
        return (*self.items[best_item], round(best, 4))
