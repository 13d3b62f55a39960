"""Secrets and PII redaction of code files (after the file filters, before dedup).

Every hit is replaced in the text by a typed placeholder:

* ``<SECRET>``       keys, tokens and passwords, found by four sources:

  1. **gitleaks' rule set** (``rules/gitleaks.toml``, vendored unchanged at the version in
     ``secret_rules.RULE_SET``): ~220 vendor formats and its ``generic-api-key`` rule, run as
     gitleaks runs them (keywords, secretGroup, entropy, allowlists, paths); what of it is changed
     and what not applied: ``secret_rules.py``.
  2. **Credentials named by their variable** (``credential:*``, ``secret_rules.py``): a value
     assigned to a credential name (``*_API_KEY``, ``HF_TOKEN``, ``password=``, ``?api_key=...``)
     when it has a credential's shape.
  3. ``detect-secrets`` (pip ``detect-secrets``) with a curated set of keyword-free,
     format-specific plugins (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, JWT, Basic-auth URLs, npm,
     PyPI, SendGrid, Twilio, Azure storage keys, ...). A plugin's ``analyze_string`` runs on the
     lines that hold a literal every match of one of its patterns contains (derived from the
     patterns; a pattern without one gates on a whole-text search): the same findings as on every
     line. A Basic-auth password that is a placeholder (``user:pass@``, ``<user>:<password>@``) is
     kept; a value under 6 characters from another plugin is a pattern's group, not a secret (the
     GitHub plugin yields ``ghp``, which used to be redacted wherever it stood on the line). Left
     out on purpose: the entropy plugins (Base64/Hex high entropy), which flag hashes, test
     vectors, base64 data and minified code everywhere in code; the keyword plugin (any value
     after ``password =``: source 2 asks for a credential's shape); the private-key plugin (it flags
     the marker ``BEGIN RSA PRIVATE KEY`` alone, which every PEM parser contains); its public-IP
     plugin (our IP rule below); its Telegram plugin (unanchored ``\\d{8,10}:...``: it fires inside
     AWS ARNs; gitleaks' telegram rule needs its keyword). The Artifactory plugin runs with our
     copy of its patterns (``DENYLIST_OVERRIDES``): its own end a token only at whitespace, ``"``
     or the line's end (a URL's ``?key=AKC...&page=2`` was missed) and report it with the ``=``
     and quotes around it; ours also end it at ``&`` or ``#`` and report the token alone.
  4. Our regexes for the common token formats (``secret_rules.TOKENS``).

  Where hits overlap, the longer wins, then detect-secrets, ours, gitleaks' format rules, its
  generic rule, credentials by name (``Hit.source`` names the one kept).
* ``<PRIVATE_KEY>``  a whole PEM/OpenSSH/PGP private-key block, ``-----BEGIN ... PRIVATE KEY-----``
                     to the matching ``-----END ...-----``, whose body is key material (base64,
                     PEM headers, string quotes and ``\\n`` escapes, at least 64 characters); a
                     marker without a body (a parser's constant) stays. gitleaks' ``private-key``
                     rule counts only with such a body (alone it spans any text between two
                     markers, such as a parser's two constants).
* ``<EMAIL>``        e-mail addresses, except (kept) addresses at documentation domains per RFC
                     2606/6761 (``example.com``/``.org``/``.net``, any ``example.*`` label, the TLDs
                     ``.test``, ``.example``, ``.invalid``, ``.localhost``), ``git@host`` SSH remotes
                     (not a person) and asset names such as ``icon@2x.png`` (a file extension as
                     TLD). A ``user:password@host`` URL's host is not an address (the password is a
                     secret); ``mailto:`` addresses are.
* ``<IP_ADDRESS>``   IPv4 addresses (four dot-separated octets, each 0-255, not part of a longer
                     dotted number such as an OID, not after a
                     hyphen as in ``section-4.7.1.1``) that are public. Kept, as BigCode does, since
                     they identify no one: private (10/8, 172.16/12, 192.168/16), loopback,
                     unspecified (``0.0.0.0``), link-local, multicast, reserved and documentation
                     ranges (192.0.2/24, 198.51.100/24, 203.0.113/24), well-known public DNS
                     resolvers (``8.8.8.8``, ``1.1.1.1``, ...), placeholders with one repeated or
                     ascending octets (``2.2.2.2``, ``1.2.3.4``), and version strings: a dotted quad
                     right after ``v``, ``version``, ``==``, ``>=`` and the like (``1.2.3.4`` in
                     ``version 1.2.3.4``).

Also kept, since no rule matches them: hashes (40/64-hex git and SHA digests, ``sha512-...``
integrity strings of lock files), UUIDs, base64 data.

A file whose redacted characters exceed ``max_redacted_fraction`` (default 0.5) of its text is
"mostly secrets" (a key file, a credentials dump) and dropped with the reason ``mostly_secrets``
(reported as ``redaction/dropped_mostly_secrets`` in stats.json); every other file is kept,
redacted. Counts per kind go to the step's stats (``redacted_email``, ``redacted_ip_address``,
``redacted_secret``, ``redacted_private_key``, and ``redacted_files``; per rule as ``rule/<source>``,
stats.json's ``redacted_by_rule``) and to the document's metadata (the same four keys, 0 when none,
so every record has the same columns for parquet). Speed and recall: ``bench/redaction.py``.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from datatrove_pipelines.secret_rules import (PLACEHOLDER, RULE_SET, TOKENS, Hit, credential_hits, gitleaks_hits,
                                              gitleaks_rules, lowercase, required_literals, token_hits)

KINDS = ("private_key", "secret", "email", "ip_address")  # also the priority when hits overlap
PLACEHOLDERS = {"private_key": "<PRIVATE_KEY>", "secret": "<SECRET>", "email": "<EMAIL>",
                "ip_address": "<IP_ADDRESS>"}
# detect-secrets plugins (module, class): format-specific ones only, see the module docstring.
DETECT_SECRETS_PLUGINS = (
    ("artifactory", "ArtifactoryDetector"), ("aws", "AWSKeyDetector"),
    ("azure_storage_key", "AzureStorageKeyDetector"), ("basic_auth", "BasicAuthDetector"),
    ("discord", "DiscordBotTokenDetector"), ("github_token", "GitHubTokenDetector"),
    ("gitlab_token", "GitLabTokenDetector"), ("jwt", "JwtTokenDetector"), ("mailchimp", "MailchimpDetector"),
    ("npm", "NpmDetector"), ("openai", "OpenAIDetector"), ("pypi_token", "PypiTokenDetector"),
    ("sendgrid", "SendGridDetector"), ("slack", "SlackDetector"), ("square_oauth", "SquareOAuthDetector"),
    ("stripe", "StripeDetector"), ("twilio", "TwilioKeyDetector"),
)
# detect-secrets' Artifactory patterns, (?:\s|=|:|"|^)AKC...(?:\s|"|$), end a token only at whitespace, '"' or
# the line's end, so they miss a URL's query value (?key=AKC...&page=2), and they report the token with the
# characters around it, which were redacted with it ('TOKEN = <SECRET>', its quotes gone). Ours, run in
# their place: the same tokens, also ended by a URL's '&' or '#' (looked at, not consumed), the token alone
# (their group) reported.
DENYLIST_OVERRIDES = {
    "ArtifactoryDetector": (
        re.compile(r'(?:\s|=|:|"|^)(AKC[a-zA-Z0-9]{10,})(?=\s|"|$|[&#])'),  # API token
        re.compile(r'(?:\s|=|:|"|^)(AP[\dABCDEF][a-zA-Z0-9]{8,})(?=\s|"|$|[&#])'),  # encrypted password
    ),
}
INSTALL_HINT = ("the redaction step needs detect-secrets: pip install detect-secrets (it is in the 'data' extra: "
                "pip install -e .[data]), or run curate with --no-redact")

PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----"
    r"[A-Za-z0-9+/=\s\"'\\,:.()-]{64,}?"
    r"-----END \1PRIVATE KEY\2-----")
# The local part may not follow ':' or '/' (then it is a URL's user or password) unless after
# "mailto:"; the domain needs a dot and a letters-only TLD.
EMAIL = re.compile(r"(?:(?<=mailto:)|(?<![\w.%+:/-]))([A-Za-z0-9][A-Za-z0-9._%+-]*)@"
                   r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))(?![\w-]|\.\w)")
DOC_TLDS = {"test", "example", "invalid", "localhost", "local"}
FILE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "js", "mjs", "ts", "css", "scss", "py",
                   "json", "html", "htm", "md", "txt", "xml", "yaml", "yml", "pdf", "zip", "gz"}
# Not after a hyphen either: "section-4.7.1.1", "pkg-1.2.3.4" are section and version numbers.
IPV4 = re.compile(r"(?<![\w.-])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?!\w|\.\w)")
DOTTED_QUAD = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")  # in every IPV4 match: files without one skip IPV4
# Version context right before a dotted quad; a plain "=" is an assignment, not a version pin.
VERSION_BEFORE = re.compile(r"(?:\bv|\bversion|\bver|\brelease|==|>=|<=|~=|!=|\^|~)\s*[:=]?\s*[\"']?$",
                            re.IGNORECASE)
PUBLIC_DNS = {"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112", "208.67.222.222",
              "208.67.220.220", "4.2.2.2", "4.2.2.1"}


# ------------------------------------------------------------------ detect-secrets
@lru_cache(maxsize=1)
def detect_secrets_plugins() -> tuple:
    """The curated detect-secrets plugins, instantiated once per process (they hold no state).
    A missing package is an error, never a silent skip: redaction would quietly do less."""
    import importlib

    try:
        modules = {name: importlib.import_module(f"detect_secrets.plugins.{name}")
                   for name, _ in DETECT_SECRETS_PLUGINS}
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    plugins = []
    for name, cls in DETECT_SECRETS_PLUGINS:
        plugin = getattr(modules[name], cls)()
        if cls in DENYLIST_OVERRIDES:  # this instance's patterns: the class stays as detect-secrets ships it
            plugin.denylist = DENYLIST_OVERRIDES[cls]
        plugins.append(plugin)
    return tuple(plugins)


@lru_cache(maxsize=1)
def _detect_secrets_plan() -> tuple:
    """Per plugin: (plugin, case-sensitive literals, lowercase literals, gates). A line can hold a
    finding of the plugin only if it holds one of the literals, or (a pattern without a literal)
    if the pattern's MULTILINE copy finds something in the whole text."""
    plan = []
    for plugin in detect_secrets_plugins():
        exact, folded, gates = set(), set(), []
        for regex in getattr(plugin, "denylist", None) or ():
            fold = bool(regex.flags & re.IGNORECASE)
            lits = required_literals(regex.pattern, regex.flags, fold=fold)
            if lits is None:
                gates.append(re.compile(regex.pattern, regex.flags | re.MULTILINE))
            else:
                (folded if fold else exact).update(lits)
        if not (exact or folded or gates):  # no denylist: every line, as before
            gates.append(re.compile(""))
        plan.append((plugin, tuple(exact), tuple(folded), tuple(gates)))
    return tuple(plan)


def _detect_secrets_hits(text: str, low: str | None = None) -> list[Hit]:
    """Runs the plugins' ``analyze_string`` on each line (the unit detect-secrets scans) that can
    hold a finding; it yields secret values, located again in the line. Called directly rather
    than through ``scan_line``, which goes through detect-secrets' process-wide settings and filters."""
    low = lowercase(text) if low is None else low
    lines = None
    hits = []
    for rank, (plugin, exact, folded, gates) in enumerate(_detect_secrets_plan()):
        exact = [w for w in exact if w in text]
        folded = [w for w in folded if w in low]
        every_line = any(g.search(text) for g in gates)
        if not (exact or folded or every_line):
            continue
        if lines is None:
            lines, offset = [], 0
            for line in text.splitlines(keepends=True):
                lines.append((offset, line))
                offset += len(line)
        for offset, line in lines:
            if not (every_line or any(w in line for w in exact)
                    or (folded and any(w in low[offset:offset + len(line)] for w in folded))):
                continue
            for value in set(plugin.analyze_string(line)):
                value = value.strip()
                # A plugin yields a pattern's group when it has one: GitHub's "(ghp|gho|...)_..." yields
                # "ghp", which would redact every "ghp" of the line. The token itself is ours and gitleaks'.
                if len(value) < 6 and plugin.secret_type != "Basic Auth Credentials":
                    continue
                # A Basic-auth password can be short and common ("pass"): only its place in the URL;
                # a placeholder ("user:pass@", "<user>:<password>@") is no password.
                if plugin.secret_type == "Basic Auth Credentials":
                    if PLACEHOLDER.search(value) or value.lower() in ("pass", "pw", "pwd"):
                        continue
                    pattern = re.compile(r"(?<=:)" + re.escape(value) + r"(?=@)")
                else:
                    pattern = re.compile(re.escape(value))
                for m in pattern.finditer(line):
                    hits.append((offset, rank, Hit(offset + m.start(), offset + m.end(), "secret",
                                                   f"detect-secrets:{plugin.secret_type}")))
    return [h for _, _, h in sorted(hits, key=lambda x: x[:2])]


# ------------------------------------------------------------------ what runs, for stats.json
def rule_set_info() -> dict:
    """The rule set's name and version and what of it runs: for curate's stats.json."""
    rules = gitleaks_rules()
    try:
        from importlib.metadata import version

        ds = version("detect-secrets")
    except Exception:  # noqa: BLE001
        ds = None
    return {"name": RULE_SET["name"], "version": RULE_SET["version"], "commit": RULE_SET["commit"],
            "rules": rules.total, "rules_used": len(rules.rules), "rules_skipped": dict(rules.skipped),
            "detect_secrets": ds, "detect_secrets_plugins": [cls for _, cls in DETECT_SECRETS_PLUGINS],
            "own_rules": sorted(TOKENS) + ["private_key_block", "credential_by_name"]}


# ------------------------------------------------------------------ e-mails, IPs, the whole
def _email_kept(local: str, domain: str, tld: str) -> bool:
    labels = domain.lower().split(".")
    return (tld.lower() in DOC_TLDS or "example" in labels or local.lower() == "git"
            or tld.lower() in FILE_EXTENSIONS)


def _ip_kept(text: str, m: re.Match) -> bool:
    octets = [int(g) for g in m.groups()]
    if any(o > 255 for o in octets):
        return True
    # Placeholder addresses of tests and docs ("2.2.2.2", "1.2.3.4") identify no one.
    if len(set(octets)) == 1 or all(b - a == 1 for a, b in zip(octets, octets[1:])):
        return True
    address = ipaddress.IPv4Address(".".join(map(str, octets)))
    if (address.is_private or address.is_loopback or address.is_unspecified or address.is_link_local
            or address.is_multicast or address.is_reserved or str(address) in PUBLIC_DNS):
        return True
    line_start = text.rfind("\n", 0, m.start()) + 1
    return bool(VERSION_BEFORE.search(text[max(line_start, m.start() - 20):m.start()]))


SOURCE_RANK = {"detect-secrets": 0, "regex": 1, "gitleaks": 2, "credential": 3}


def find_hits(text: str, path: str | None = None) -> list[Hit]:
    """All redactions for the text, non-overlapping, in order. Where hits overlap the one of the
    higher-priority kind (KINDS order), then the longer, wins; then detect-secrets, our regexes,
    gitleaks' format rules, its generic rule, credentials by name. ``path`` (the file's, if known)
    lets the gitleaks rules that are bound to a file type run."""
    low = lowercase(text)
    found = gitleaks_rules().words.find(low)
    hits = [Hit(m.start(), m.end(), "private_key", "regex:pem") for m in PRIVATE_KEY.finditer(text)] \
        if "-----BEGIN" in text else []
    hits += _detect_secrets_hits(text, low)
    hits += token_hits(text, found)
    hits += gitleaks_hits(text, found, path)
    hits += credential_hits(text, low, found)
    if "@" in text:
        hits += [Hit(m.start(), m.end(), "email", "regex:email") for m in EMAIL.finditer(text)
                 if not _email_kept(*m.groups())]
    if DOTTED_QUAD.search(text):
        hits += [Hit(m.start(), m.end(), "ip_address", "regex:ipv4") for m in IPV4.finditer(text)
                 if not _ip_kept(text, m)]

    def rank(h: Hit):
        family = h.source.split(":", 1)[0]
        generic = h.source == "gitleaks:generic-api-key"
        return KINDS.index(h.kind), h.start - h.end, SOURCE_RANK[family] + generic

    chosen: list[Hit] = []
    for hit in sorted(hits, key=rank):
        if all(hit.end <= c.start or hit.start >= c.end for c in chosen):
            chosen.append(hit)
    return sorted(chosen, key=lambda h: h.start)


def redact(text: str, hits: list[Hit] | None = None, path: str | None = None) -> tuple[str, list[Hit]]:
    """The text with every hit replaced by its placeholder, and the hits."""
    hits = find_hits(text, path) if hits is None else hits
    parts, last = [], 0
    for hit in hits:
        parts += [text[last:hit.start], PLACEHOLDERS[hit.kind]]
        last = hit.end
    parts.append(text[last:])
    return "".join(parts), hits


class SecretRedactor(BaseFilter):
    name = "🔒 secrets and PII redaction"

    def __init__(self, max_redacted_fraction: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_redacted_fraction = max_redacted_fraction

    def run(self, data, rank: int = 0, world_size: int = 1):
        detect_secrets_plugins()  # fail at the start of the task, with the install hint
        gitleaks_rules()
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, hits = redact(doc.text, path=doc.metadata.get("path") or None)
        counts = {kind: 0 for kind in KINDS}
        for hit in hits:
            counts[hit.kind] += 1
        redacted_chars = sum(hit.end - hit.start for hit in hits)
        if doc.text and redacted_chars / len(doc.text) > self.max_redacted_fraction:
            return False, "mostly_secrets"
        for kind, count in counts.items():
            doc.metadata[f"redacted_{kind}"] = count
            if count:
                self.stat_update(f"redacted_{kind}", value=count)
        for hit in hits:
            if hit.kind in ("secret", "private_key"):
                self.stat_update(f"rule/{hit.source}")
        if hits:
            self.stat_update("redacted_files")
            doc.text = text
        return True
