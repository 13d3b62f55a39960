"""The secret rules of the redaction step (``redaction.py``) that are ours to run, each returning
``Hit``s: sources 1, 2 and 4 of its ``<SECRET>`` hits (source 3, detect-secrets' plugins, and the
choice among overlapping hits are in ``redaction.py``):

* **gitleaks' rule set** (``rules/gitleaks.toml``, copied unchanged from gitleaks; name, tag and
  SHA-256 in ``RULE_SET``, license in ``rules/NOTICE``): ~220 vendor formats (cloud, VCS, CI,
  payment, chat, AI providers, Hugging Face ``hf_...``, ...) and its ``generic-api-key`` rule,
  run as gitleaks runs them: a rule runs on a file only when one of its ``keywords`` is in it
  (case-insensitive, one Aho-Corasick pass for all rules), its ``secretGroup`` (else the first
  non-empty group) is the secret, a secret at or under the rule's ``entropy`` is kept, and the
  global and the rule's ``allowlists`` (regexes on the secret, the match or the line,
  stopwords, AND conditions with paths) keep what they allow. A rule with a ``path`` runs only on
  files of that path (a document's ``metadata["path"]``). Go RE2 syntax is converted for Python
  (mid-pattern ``(?i)`` flags become scoped ``(?i:...)`` over the rest of their group, ``\\z`` ->
  ``\\Z``, POSIX classes); a rule that cannot be converted is skipped and listed in
  ``redaction.rule_set_info()`` (curate's stats.json: ``redaction_rules``). Two changes of form
  only (the same matches, faster): the leading ``[\\w.-]{0,50}?`` of the keyword rules is dropped (the
  match is found from its keyword; the identifier before it is added back for ``match``
  allowlists), and each rule is tried only where its literal prefix occurs. Changes of
  substance, each measured by ``bench/redaction.py``: the end-of-token guard
  ``(?:[\\x60'"\\s;]|\\\\[nr]|$)`` also accepts ``, ) ] } > & @ # | < (`` after the token (the
  delimiters of code and URLs: ``f(token="...")`` was caught, ``?key=...&`` was not; for
  ``generic-api-key`` only ``&``, since in code ``key=f(x), y=z`` would end a "secret" at the
  comma); ``generic-api-key`` also keeps identifiers and dotted names (``win32api.RegEnumKey``,
  ``Europe/Dublin``, ``Sapiens2ForPoseEstimation``), placeholders (``eyJ...``) and an unquoted
  value after a comma (``AutoTokenizer, Qwen2ForCausalLM``); a rule whose groups mark structure
  rather than the secret (named groups, a group inside a repeat: ``jwt-base64``,
  ``microsoft-teams-webhook``) has its whole match redacted, not the first group gitleaks
  reports. Not applied: the global path allowlist (it skips whole files such as
  ``node_modules/``; a corpus redacts those too) and ``pkcs12-file`` (a path-only rule: binary
  files, never text here).
* **Credentials named by their variable** (``credential:*``): a value assigned to a credential
  name, ``*_API_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``, ``HF_TOKEN``, ``WANDB_API_KEY``,
  ``key=``/``token=``/``api_key=``/``password=`` keyword arguments, config dict keys, ``.env``,
  YAML, INI and URL query parameters (``?api_key=...``), ``os.environ["..."] = ...`` and
  ``setdefault("NAME", "...")``, when the value has a credential's shape: no spaces, not a
  placeholder (``xxx``, ``<your key>``, ``your-api-key``, ``${VAR}``, ``None``, ``...``, an
  identifier or a path), and for tokens at least 16 characters (20 after a bare ``key``) with
  digits or mixed case and Shannon entropy >= 3.0 (3.3 after a bare ``key``); for passwords at
  least 8 characters of three character classes (or 12 of two, entropy >= 3.0).
* Our regexes for the common token formats (``ghp_...``, ``github_pat_...``, ``xox[baprs]-...``,
  ``AKIA``/``ASIA`` + 16, ``sk-...`` of any length (gitleaks asks for OpenAI's ``T3BlbkFJ``
  marker), ``sk_live_...``, ``AIza...``, ``glpat-...``, JWTs).

What they run on: Go RE2 syntax converted for Python (``go_to_python``); the literals that start
(``literal_prefixes``: the anchors where a rule is tried) or are in (``required_literals``: the line
gate of the detect-secrets plugins) every match of a pattern; one pass for all keywords and anchors
(``_Words``); a lowercase copy of the same length (``lowercase``); Shannon entropy. Also here:
gitleaks' private-key body check (``KEY_BLOCK``) and ``Hit``, the record every source returns.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

try:
    from re import _parser as _sre  # Python >= 3.11
except ImportError:  # pragma: no cover
    import sre_parse as _sre

RULES_DIR = Path(__file__).resolve().parent / "rules"
# The vendored rule set: rules/gitleaks.toml is gitleaks' config/gitleaks.toml at this tag, unchanged.
RULE_SET = {"name": "gitleaks", "version": "v8.30.1", "commit": "83d9cd684c87d95d656c1458ef04895a7f1cbd8e",
            "file": "gitleaks.toml", "license": "MIT",
            "sha256": "e163e53b9e7e8a8511e77271e2b323ed057759542a6d988258afe3a1fa329caf"}
# gitleaks' private-key match counts only when what lies between its markers is key material.
KEY_BLOCK = re.compile(r"-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----[A-Za-z0-9+/=\s\"'\\,:.()-]{64,}"
                       r"-----END[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----", re.IGNORECASE)
TOKENS = {
    "github": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})\b"),
    "gitlab": re.compile(r"\bglpat-[A-Za-z0-9_-]{20,50}(?![\w-])"),
    "slack": re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"),
    "aws_access_key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "openai": re.compile(r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{32,}"),
    "stripe": re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    "google_api_key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])"),
    # detect-secrets' JWT regex ends lazily and can stop inside the signature: the whole token.
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
}


@dataclass(frozen=True)
class Hit:
    start: int
    end: int
    kind: str  # one of redaction.KINDS: "secret" or "private_key" here
    # "gitleaks:<rule id>", "credential:<token|key|password>", "detect-secrets:<secret type>" or "regex:<name>"
    source: str


# ------------------------------------------------------------------ Go RE2 -> Python re
_POSIX = {"alnum": "0-9A-Za-z", "alpha": "A-Za-z", "digit": "0-9", "lower": "a-z", "upper": "A-Z",
          "space": r"\t\n\v\f\r ", "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f", "punct": r"!-/:-@\[-`{-~",
          "blank": r" \t", "cntrl": r"\x00-\x1f\x7f", "print": r" -~", "graph": r"!-~", "ascii": r"\x00-\x7f"}
_FLAG_GROUP = re.compile(r"\(\?([a-zA-Z]*(?:-[a-zA-Z]+)?)\)")
GO_GUARD = r"""(?:[\x60'"\s;]|\\[nr]|$)"""
# The same guard, also ending a token at the delimiters of code and URLs (looked at, not consumed).
WIDE_GUARD = r"""(?:[\x60'"\s;]|\\[nr]|$|(?=[,)\]}>&@#|<(]))"""
GENERIC_RULE = "generic-api-key"
GENERIC_GUARD = r"""(?:[\x60'"\s;]|\\[nr]|$|(?=&))"""
SEMI_GENERIC = re.compile(r"^(\(\?i\))?\[\\w\.-\]\{0,50\}\?")


def _atom_end(p: str, i: int) -> int:
    """The end of the escape or character class starting at ``p[i]``."""
    if p[i] == "\\":
        return i + 2
    if p[i] != "[":
        return i + 1
    j = i + 1 + (p[i + 1:i + 2] == "^")
    j += p[j:j + 1] == "]"
    while p[j] != "]":
        j = p.index(":]", j + 2) + 2 if p.startswith("[:", j) else j + (2 if p[j] == "\\" else 1)
    return j + 1


def _go_class(cls: str) -> str:
    """A Go character class for Python: POSIX names expanded; '[', '&', '~', '|' and '--' escaped
    (literal in Go, set operators to be in Python)."""
    out, j = ["["], 1
    if cls[1:2] == "^":
        out.append("^")
        j = 2
    while j < len(cls) - 1:
        if cls[j] == "\\":
            out.append(cls[j:j + 2])
            j += 2
        elif cls.startswith("[:", j):
            k = cls.index(":]", j)
            name = cls[j + 2:k]
            if name not in _POSIX:
                raise ValueError(f"POSIX class [:{name}:]")
            out.append(_POSIX[name])
            j = k + 2
        else:
            out.append("\\" + cls[j] if cls[j] in "[&~|" or cls[j:j + 2] == "--" else cls[j])
            j += 1
    return "".join(out) + "]"


def go_to_python(p: str) -> str:
    """Go RE2 syntax as Python ``re`` syntax. ValueError where there is no equivalent here."""
    out, i = [], 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            nxt = p[i + 1]
            if nxt in "QEpPCX" or p.startswith("\\x{", i):
                raise ValueError(f"RE2 escape \\{nxt}")
            out.append(r"\Z" if nxt == "z" else p[i:i + 2])
            i += 2
        elif c == "[":
            j = _atom_end(p, i)
            out.append(_go_class(p[i:j]))
            i = j
        elif c == "(" and (m := _FLAG_GROUP.match(p, i)) and i > 0:
            # RE2: the flags hold to the end of the enclosing group, in each alternative after them.
            j, depth, start, alternatives = m.end(), 0, m.end(), []
            while j < len(p) and not (p[j] == ")" and depth == 0):
                if p[j] in "\\[":
                    j = _atom_end(p, j)
                    continue
                depth += {"(": 1, ")": -1}.get(p[j], 0)
                if p[j] == "|" and depth == 0:
                    alternatives.append(p[start:j])
                    start = j + 1
                j += 1
            alternatives.append(p[start:j])
            out.append("|".join(f"(?{m.group(1)}:{go_to_python(a)})" if a else "" for a in alternatives))
            i = j
        else:
            if c == "(" and p.startswith("(?<", i) and p[i + 3:i + 4] not in "=!":
                raise ValueError("named group (?<name>...)")
            out.append(c)
            i += 1
    return "".join(out)


# ------------------------------------------------------------------ literal prefixes (anchors)
def _starts(items, fold: bool, need: int = 4, cap: int = 64):
    """[(literal, complete)]: each match of ``items`` starts with one of the literals (complete:
    the literal is that whole match). None when there are more than ``cap``."""
    outs = [("", True)]
    for op, av in items:
        grown = []
        for s, complete in outs:
            if not complete or len(s) >= need:
                grown.append((s, False))
                continue
            alts = _atom_starts(op, av, fold, need - len(s), cap)
            if alts is None:
                return None
            grown += [(s + t, c) for t, c in alts]
        outs = list(dict.fromkeys(grown))
        if len(outs) > cap:
            return None
        if not any(c for _, c in outs):
            break
    return outs


def _atom_starts(op, av, fold, need, cap):
    if op is _sre.LITERAL:
        return [(chr(av).lower() if fold else chr(av), True)]
    if op is _sre.AT or op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return [("", True)]  # zero-width
    if op is _sre.IN and len(av) <= 8 and all(o is _sre.LITERAL for o, _ in av):
        return [(c, True) for c in dict.fromkeys(chr(v).lower() if fold else chr(v) for _, v in av)]
    if op is _sre.SUBPATTERN:
        return _starts(av[-1], fold, need, cap)
    if op is _sre.BRANCH:
        alts = [_starts(alt, fold, need, cap) for alt in av[1]]
        return None if any(a is None for a in alts) else [x for a in alts for x in a]
    if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and av[0] >= 1:
        first = _starts(av[2], fold, need, cap)
        return None if first is None else [(s, False) for s, _ in first]
    return [("", False)]


def literal_prefixes(pattern: str, flags: int = 0, fold: bool = True, minimum: int = 2):
    """Literals (lowercased when ``fold``) one of which starts every match of ``pattern``, or None."""
    outs = _starts(_sre.parse(pattern, flags), fold)
    if not outs or any(len(s) < minimum for s, _ in outs):
        return None
    return tuple(sorted({s for s, _ in outs}))


def required_literals(pattern: str, flags: int = 0, fold: bool = False):
    """The best set of literals one of which every match of ``pattern`` contains (from any
    top-level position: the longest shortest literal), or None when none has 2 characters."""
    items = list(_sre.parse(pattern, flags))
    best = None
    for i in range(len(items)):
        outs = _starts(items[i:], fold)
        if outs and all(s for s, _ in outs):
            score = min(len(s) for s, _ in outs)
            if score >= 2 and (best is None or score > best[0]):
                best = (score, tuple(sorted({s for s, _ in outs})))
    return None if best is None else best[1]


# ------------------------------------------------------------------ keyword/anchor search
class _Words:
    """Every occurrence of a set of lowercase words in a text, in one pass (Aho-Corasick through
    pyahocorasick, which datatrove[processing] installs; str.find per word without it)."""

    def __init__(self, words):
        self.words = tuple(sorted(set(words)))
        try:
            import ahocorasick
        except ImportError:
            self.automaton = None
            return
        self.automaton = ahocorasick.Automaton()
        for w in self.words:
            self.automaton.add_word(w, w)
        self.automaton.make_automaton()

    def find(self, low: str) -> dict[str, list[int]]:
        """{word: [start, ...]} for the words found in ``low``."""
        found: dict[str, list[int]] = {}
        if self.automaton is not None:
            for end, w in self.automaton.iter(low):
                found.setdefault(w, []).append(end - len(w) + 1)
            return found
        for w in self.words:
            i = low.find(w)
            while i >= 0:
                found.setdefault(w, []).append(i)
                i = low.find(w, i + 1)
        return found


def lowercase(text: str) -> str:
    """Lowercase with the same length (ASCII only where Unicode lowering would change it)."""
    low = text.lower()
    if len(low) != len(text):
        low = "".join(c.lower() if c.isascii() else c for c in text)
    return low


def shannon_entropy(s: str) -> float:
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in (s.count(ch) for ch in set(s)))


# ------------------------------------------------------------------ gitleaks rules
@dataclass(frozen=True)
class Allowlist:
    target: str  # "secret", "match" or "line"
    regexes: tuple
    stopwords: tuple
    paths: tuple
    all_of: bool  # condition = "AND"

    def allows(self, secret: str, match: str, line: str, path) -> bool:
        target = {"secret": secret, "match": match, "line": line}[self.target]
        regex = any(r.search(target) for r in self.regexes) if self.regexes else False
        low = secret.lower()
        stop = any(w in low for w in self.stopwords) if self.stopwords else False
        if not self.all_of:
            return regex or stop
        checks = ([regex] if self.regexes else []) + ([stop] if self.stopwords else [])
        if self.paths:
            checks.append(path is not None and any(p.search(path) for p in self.paths))
        return bool(checks) and all(checks)


@dataclass(frozen=True)
class Rule:
    id: str
    regex: re.Pattern
    keywords: tuple  # lowercase; the rule runs on a text holding one of them
    anchors: tuple | None  # lowercase literals every match starts with; None: search the whole text
    entropy: float
    secret_group: int
    path: re.Pattern | None
    skip_paths: tuple  # the rule's allowlists of paths alone: files it does not run on
    allowlists: tuple
    extend_left: bool  # its leading [\w.-]{0,50}? was dropped
    kind: str
    whole_match: bool = False  # its groups mark structure (named, repeated), not the secret


@dataclass(frozen=True)
class RuleSet:
    rules: tuple
    skipped: dict  # rule id -> why
    total: int
    allowlist: Allowlist  # the global one (its paths are not applied: see the module docstring)
    words: _Words


def _structural_groups(regex: re.Pattern) -> bool:
    """Named groups, or a first group inside a repeat (jwt-base64's header fields, the teams webhook's
    ``([a-z0-9]{4}-){3}``): gitleaks would report that piece as the secret; we redact the whole match."""
    def first(items, repeated):
        for op, av in items:
            if op is _sre.SUBPATTERN:
                if av[0] is not None:
                    return repeated
                found = first(av[-1], repeated)
            elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
                found = first(av[2], repeated or av[1] > 1)
            elif op is _sre.BRANCH:
                found = next((f for f in (first(alt, repeated) for alt in av[1]) if f is not None), None)
            else:
                continue
            if found is not None:
                return found
        return None

    return bool(regex.groupindex) or bool(first(_sre.parse(regex.pattern, regex.flags), False))


def _compile(go_pattern: str) -> re.Pattern:
    return re.compile(go_to_python(go_pattern), re.ASCII)


def _allowlist(raw: dict) -> Allowlist:
    return Allowlist(target=raw.get("regexTarget", "secret") or "secret",
                     regexes=tuple(_compile(r) for r in raw.get("regexes", ())),
                     stopwords=tuple(w.lower() for w in raw.get("stopwords", ())),
                     paths=tuple(_compile(p) for p in raw.get("paths", ())),
                     all_of=str(raw.get("condition", "OR")).upper() == "AND")


@lru_cache(maxsize=1)
def gitleaks_rules() -> RuleSet:
    """The vendored gitleaks rules, converted and compiled once per process."""
    with open(RULES_DIR / RULE_SET["file"], "rb") as f:
        config = tomllib.load(f)
    glob = config.get("allowlist", {})
    rules, skipped = [], {}
    for raw in config["rules"]:
        rid = raw["id"]
        if "regex" not in raw:
            skipped[rid] = "path-only rule (a file name, not text)"
            continue
        pattern, extend_left = raw["regex"], False
        if SEMI_GENERIC.match(pattern):
            pattern, extend_left = SEMI_GENERIC.sub(lambda m: m.group(1) or "", pattern, count=1), True
        # In code, "key=f(x), y=z" would end a generic "secret" at the comma: that rule ends only at '&'.
        pattern = pattern.replace(GO_GUARD, WIDE_GUARD if rid != GENERIC_RULE else GENERIC_GUARD)
        try:
            regex = _compile(pattern)
            allowlists = [_allowlist(a) for a in raw.get("allowlists", ())]
            path = _compile(raw["path"]) if raw.get("path") else None
        except (ValueError, re.error) as e:
            skipped[rid] = f"regex not convertible to Python: {e}"
            continue
        skip_paths = tuple(p for a in allowlists if a.paths and not a.all_of and not a.regexes and not a.stopwords
                           for p in a.paths)
        rules.append(Rule(
            id=rid, regex=regex, keywords=tuple(k.lower() for k in raw.get("keywords", ())),
            anchors=literal_prefixes(regex.pattern, re.ASCII), entropy=float(raw.get("entropy", 0) or 0),
            secret_group=int(raw.get("secretGroup", 0) or 0), path=path, skip_paths=skip_paths,
            allowlists=tuple(a for a in allowlists if not (a.paths and not a.all_of and not a.regexes
                                                           and not a.stopwords)),
            extend_left=extend_left, kind="private_key" if rid == "private-key" else "secret",
            whole_match=not raw.get("secretGroup") and _structural_groups(regex)))
    words = {k for r in rules for k in r.keywords} | {a for r in rules for a in (r.anchors or ())}
    words |= set(CREDENTIAL_WORDS) | {a for a in _token_anchors().values() for a in a}
    return RuleSet(rules=tuple(rules), skipped=skipped, total=len(config["rules"]),
                   allowlist=Allowlist("secret", tuple(_compile(r) for r in glob.get("regexes", ())),
                                       tuple(w.lower() for w in glob.get("stopwords", ())), (), False),
                   words=_Words(words))



def _matches(regex: re.Pattern, anchors, text: str, found: dict):
    """regex.finditer(text), tried only where one of its anchors starts (same matches)."""
    if anchors is None:
        yield from regex.finditer(text)
        return
    starts = sorted({s for a in anchors for s in found.get(a, ())})
    last = 0
    for s in starts:
        if s < last:
            continue
        m = regex.match(text, s)
        if m:
            yield m
            last = max(m.end(), s + 1)


def _line(text: str, start: int, end: int) -> str:
    e = text.find("\n", end)
    return text[text.rfind("\n", 0, start) + 1:len(text) if e < 0 else e]


def gitleaks_hits(text: str, found: dict, path) -> list[Hit]:
    rules = gitleaks_rules()
    hits = []
    for rule in rules.rules:
        if rule.keywords and not any(k in found for k in rule.keywords):
            continue
        if rule.path is not None and (path is None or not rule.path.search(path)):
            continue
        if path is not None and any(p.search(path) for p in rule.skip_paths):
            continue
        last_end = 0
        for m in _matches(rule.regex, rule.anchors, text, found):
            start, end = m.span()
            floor, last_end = max(last_end, start - 50), end  # where gitleaks' own match could start
            # gitleaks trims newlines off the match; the secret is the secretGroup or the first non-empty group.
            while start < end and text[start] == "\n":
                start += 1
            while end > start and text[end - 1] == "\n":
                end -= 1
            s_start, s_end = start, end
            if rule.regex.groups and not rule.whole_match:
                if rule.secret_group:
                    s_start, s_end = m.span(rule.secret_group)
                else:
                    s_start, s_end = next((m.span(g) for g in range(1, rule.regex.groups + 1)
                                           if m.start(g) >= 0 and m.end(g) > m.start(g)), (start, end))
                if s_start < 0 or s_end <= s_start:
                    continue
            secret = text[s_start:s_end]
            if rule.entropy and shannon_entropy(secret) <= rule.entropy:
                continue
            if rule.extend_left:  # the identifier before the keyword, as gitleaks' match has it
                while start > floor and (text[start - 1].isascii() and (text[start - 1].isalnum()
                                                                        or text[start - 1] in "_.-")):
                    start -= 1
            match = text[start:end]
            line = _line(text, start, end)
            if any(a.allows(secret, match, line, path) for a in (rules.allowlist, *rule.allowlists)):
                continue
            if rule.id == GENERIC_RULE and (_wordlike(secret) or PLACEHOLDER.search(secret) or (
                    text[start:s_start].rstrip(" \t\r\n'\"`=").endswith(",") and text[s_start - 1] not in "'\"`")):
                continue  # ours: an identifier or dotted name, a placeholder, "Tokenizer, Qwen2ForCausalLM"
            if rule.kind == "private_key" and not KEY_BLOCK.fullmatch(secret):
                continue
            hits.append(Hit(s_start, s_end, rule.kind, f"gitleaks:{rule.id}"))
    return hits


# ------------------------------------------------------------------ credentials named by their variable
# The word a credential's name ends with (lowercase; also the anchors of the search).
CREDENTIAL_WORDS = ("key", "token", "secret", "password", "passwd", "passphrase", "pwd", "_pass", "credential",
                    "credentials", "auth", "authorization")
PASSWORD_WORDS = ("password", "passwd", "passphrase", "pwd", "_pass")
# Names that end in a credential word and name no credential.
NOT_CREDENTIAL = re.compile(
    r"(?:^|[_.-])(?:public|pub|primary|foreign|sort|cache|lookup|partition|hash|dict|row|index|idx|bucket|object|"
    r"s3|schema|sequence|natural|hot|group|field|map|order|column|table|range|shard|routing|dedup|idempotency|"
    r"csrf|xsrf|page|next|prev|continuation|cancel|cancellation|sync|resume|pagination|start|end|stop|eos|bos|"
    r"pad|unk|sep|cls|mask|special|image|audio|video|default|max|min|num|n|sample|special|split|file|path)"
    r"[_.-]?(?:key|token)$")
# Before a word: the name's start, a separator, a camelCase boundary, or one of these compounds
# (AWSKEY=+F45...: gitleaks' generic rule wants a value starting with a letter or digit, detect-secrets'
# AWS plugin wants quotes; only the name finds it).
CREDENTIAL_COMPOUNDS = re.compile(r"(?:api|secret|access|private|master|auth|client|app|bot|refresh|bearer|id|"
                                  r"session|signing|encryption|db|admin|root|user|login|mysql|postgres|redis|aws)"
                                  r"(?:key|token|secret|password|passwd|pwd)$")
CREDENTIAL_VALUE = re.compile(r"""
    (?P<close>["'`]?)\]?[ \t]*                                   # "token": / ["HF_TOKEN"] =
    (?::[ \t]*[A-Za-z_][\w.\[\], |]{0,40}?[ \t]*(?==))?          # a type annotation: TOKEN: str = ...
    (?P<op>:=|=>|\?=|\|\|=|=(?![=>])|:(?![:=])|,)[ \t]*
    (?:[bBrRuU]{1,2}(?=["']))?
    (?:(?P<q>["'`])(?P<quoted>[^"'`\s\\]{6,300})(?P=q)
      |(?P<bare>[^\s"'`,;&\#()\[\]{}<>\\|][^\s"'`,;&()\[\]{}<>\\|]{5,299})(?=[\s"'`,;&\#)\]}<>|]|\\[nrt]|$))
    """, re.VERBOSE | re.ASCII)
AUTH_VALUE = re.compile(r"[\"'`]?[ \t]*[:=,][ \t]*[\"'`]?(?:Bearer|Basic|Token|token|bearer|Bot)[ \t]+"
                        r"([A-Za-z0-9._~+/=:-]{16,})(?=[\"'`\s]|$)")
PLACEHOLDER = re.compile(r"your|^my[_-]|example|sample|placeholder|dummy|fake|changeme|change[_-]me|replace|redacted|"
                         r"insert|enter[_-]|xxxx|\*\*\*|\.\.\.|<|>|\$\{|^\$[A-Za-z_]|%\(|\{\{|\}\}|^\{.*\}$|^%.*%$|"
                         r"^(?:none|null|nil|true|false|undefined|secret|password|passwd|token|api[_-]?key)$",
                         re.IGNORECASE)
_NAME_CHAR = re.compile(r"[A-Za-z0-9_.-]")
# A lowercase, UPPERCASE or Capitalized word, CamelCase (humps of 3+ letters), a number; or, in at most
# 10 characters, a word and a number (PKCS7, win32, utf8mb4, Qwen2) or a number and a word (64KEY, 2nd).
_WORD = re.compile(r"[a-z]+|[A-Z]+|[A-Z][a-z]+|[a-z]{2,}(?:[A-Z][a-z]{2,})+|(?:[A-Z][a-z]{2,})+|\d+")
_WORD_NUMBER = re.compile(r"(?:[a-z]+|[A-Z]+|[A-Z][a-z]+)\d{1,3}(?:[a-z]{1,3}\d{0,2})?"
                          r"|\d{1,4}(?:[a-z]{1,5}|[A-Z]{1,5})")
_CAMEL_HUMP = re.compile(r"[A-Z][a-z]{2,}|[a-z]{3,}|[A-Z]{1,4}(?![a-z])|\d{1,3}")


def _word_letters(part: str):
    """Letters of ``part`` in words of 3+ letters; None when the part is no word, number or identifier."""
    if part.isdigit():
        return 0
    if _WORD.fullmatch(part):
        return len(part) if len(part) >= 3 else 0
    if len(part) <= 10 and _WORD_NUMBER.fullmatch(part):  # PKCS7, RIPEMD160, win32api
        lead = len(part) - len(part.lstrip(string.ascii_letters))
        return lead if lead >= 3 else 0
    humps = _CAMEL_HUMP.findall(part)  # CamelCase with numbers: Sapiens2ForPoseEstimation, Qwen2ForCausalLM
    words = [h for h in humps if len(h) >= 3 and h[1:].islower()]
    if ("".join(humps) == part and len(words) >= 2 and sum(map(len, words)) >= 0.7 * len(part)
            and all(h[0].isupper() for h in words[1:]) and all(re.search("[aeiouy]", h[1:], re.I) for h in words)
            and sum(h.isdigit() for h in humps) <= 2):
        return sum(map(len, words))
    return None


def _wordlike(value: str) -> bool:
    """Code, not a credential: parts split at ``_ . - / : = ,`` each a word, a number or an
    identifier, at least 40% of it in words of 3+ letters (``Europe/Dublin``, ``win32api.RegEnumKey``,
    ``skip_if_logged_in=not``, ``Sapiens2ForPoseEstimation``; not ``J3-q_fepb1hi.E``)."""
    letters = [_word_letters(p) for p in re.split(r"[_.\-/:=,]+", value) if p]
    return bool(letters) and None not in letters and sum(letters) >= 0.4 * len(value)


def token_shaped(value: str, strict: bool = False) -> bool:
    """Long, random-looking, no placeholder, path or identifier (``strict``: after a bare ``key``)."""
    if len(value) < (20 if strict else 16) or PLACEHOLDER.search(value) or _wordlike(value):
        return False
    if value.startswith(("./", "../", "~/")) or "://" in value or re.search(r"[{}()\[\]$%|,;]", value):
        return False
    digit = any(c.isdigit() for c in value)
    upper = sum(c.isupper() for c in value)
    lower = sum(c.islower() for c in value)
    if not digit and not (upper and lower and 0.2 <= upper / (upper + lower) <= 0.8):
        return False  # a word, or CamelCase
    if re.fullmatch(r"[\d._:+-]+", value) or re.search(r"\.(?:[a-z]{2,4})$", value) and not digit:
        return False
    return shannon_entropy(value) >= (3.3 if strict else 3.0)


def password_shaped(value: str) -> bool:
    """8+ characters of three classes (lower, upper, digit, other), or 12+ of two with entropy >= 3;
    not a placeholder, an identifier or a pattern (a bracketed group: r'([a-f0-9]{48})')."""
    if len(value) < 8 or len(value) > 200 or PLACEHOLDER.search(value) or _wordlike(value) \
            or re.search(r"\([^)]*\)|\[[^\]]*\]|\{[^}]*\}", value):
        return False
    classes = (any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
               + any(not c.isalnum() for c in value))
    return classes >= 3 or (classes == 2 and len(value) >= 12 and shannon_entropy(value) >= 3.0)


def _opens_call(text: str, i: int) -> bool:
    """``text[i]`` is, or follows only whitespace after, a '('."""
    while i >= 0 and text[i] in " \t\r\n":
        i -= 1
    return i >= 0 and text[i] == "("


def credential_hits(text: str, low: str, found: dict) -> list[Hit]:
    hits = []
    n = len(text)
    for word in CREDENTIAL_WORDS:
        for s in found.get(word, ()):
            e = s + len(word)
            if e < n and (text[e].isalnum() or text[e] in "_-."):
                continue  # the name goes on (token_type, keys, key.value)
            ns = s
            while ns > 0 and s - ns < 80 and _NAME_CHAR.match(text, ns - 1):
                ns -= 1
            name = low[ns:e].lstrip(".-_")
            if not name or NOT_CREDENTIAL.search(name):
                continue
            if not (ns == s or text[s - 1] in "_.-" or word.startswith("_")
                    or (text[s].isupper() and text[s - 1].islower()) or CREDENTIAL_COMPOUNDS.search(name)
                    or word in ("password", "passwd", "passphrase", "token", "secret")):
                continue  # "monkey", "turkey": "key" is a part of another word (a "gitlabtoken" is a token)
            if word == "authorization":  # "Authorization": "Bearer <token>", Authorization: token <token>
                m = AUTH_VALUE.match(text, e)
                if not m:
                    continue
                (v_start, v_end), kind = m.span(1), "token"
            else:
                m = CREDENTIAL_VALUE.match(text, e)
                if not m or (m.group("op") == "," and not (m.group("close") and ns >= 2
                                                           and text[ns - 1] == m.group("close")
                                                           and _opens_call(text, ns - 2))):
                    continue  # a comma assigns only in ("NAME", "value"): setdefault, getenv, pairs
                v_start, v_end = m.span("quoted") if m.group("quoted") else m.span("bare")
                kind = ("password" if word in PASSWORD_WORDS
                        else "key" if name.rsplit(".", 1)[-1] == "key" else "token")
            value = text[v_start:v_end]
            ok = password_shaped(value) if kind == "password" else token_shaped(value, strict=kind == "key")
            if ok and not gitleaks_rules().allowlist.allows(value, value, "", None):
                hits.append(Hit(v_start, v_end, "secret", f"credential:{kind}"))
    return list(dict.fromkeys(hits))


# ------------------------------------------------------------------ our token regexes
@lru_cache(maxsize=1)
def _token_anchors() -> dict:
    return {name: literal_prefixes(regex.pattern) for name, regex in TOKENS.items()}


def token_hits(text: str, found: dict) -> list[Hit]:
    """Our regexes' hits (``TOKENS``), each tried where its literal prefix occurs in ``found``."""
    anchors = _token_anchors()
    return [Hit(m.start(), m.end(), "secret", f"regex:{name}") for name, regex in TOKENS.items()
            for m in _matches(regex, anchors[name], text, found)]
