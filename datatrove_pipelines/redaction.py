"""Secrets and PII redaction of code files (after the file filters, before dedup).

Every hit is replaced in the text by a typed placeholder:

* ``<SECRET>``       keys, tokens and passwords. Found by ``detect-secrets`` (pip ``detect-secrets``)
                     with a curated set of keyword-free, format-specific plugins (AWS, GitHub,
                     GitLab, Slack, Stripe, OpenAI, JWT, Basic-auth URLs, npm, PyPI, SendGrid,
                     Twilio, ...), each line scanned in memory, plus our own regexes for the common
                     token formats (``ghp_...``, ``github_pat_...``, ``xox[baprs]-...``,
                     ``AKIA``/``ASIA`` + 16, ``sk-...``, ``sk_live_...``, ``AIza...``, ``glpat-...``)
                     so a format detect-secrets misses (or a release that drops a plugin) is still
                     redacted. Left out on purpose: the entropy plugins (Base64/Hex high entropy),
                     which flag hashes, test vectors, base64 data and minified code everywhere in
                     code; the keyword plugin (``password = ...`` with any value: mostly variable
                     names and placeholders in code); detect-secrets' private-key plugin (it flags
                     the marker ``BEGIN RSA PRIVATE KEY`` alone, which every PEM parser contains: we
                     redact whole key blocks instead); its public-IP plugin (our IP rule below);
                     its Telegram plugin (unanchored ``\\d{8,10}:...``: it fires inside AWS ARNs).
* ``<PRIVATE_KEY>``  a whole PEM/OpenSSH/PGP private-key block, ``-----BEGIN ... PRIVATE KEY-----``
                     to the matching ``-----END ...-----``, whose body is key material (base64,
                     PEM headers, string quotes and ``\\n`` escapes, at least 64 characters); a
                     marker without a body (a parser's constant) stays.
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
``redacted_secret``, ``redacted_private_key``, and ``redacted_files``) and to the document's
metadata (the same four keys, 0 when none, so every record has the same columns for parquet).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

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
INSTALL_HINT = ("the redaction step needs detect-secrets: pip install detect-secrets (it is in the 'data' extra: "
                "pip install -e .[data]), or run curate with --no-redact")

PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----"
    r"[A-Za-z0-9+/=\s\"'\\,:.()-]{64,}?"
    r"-----END \1PRIVATE KEY\2-----")
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
# The local part may not follow ':' or '/' (then it is a URL's user or password) unless after
# "mailto:"; the domain needs a dot and a letters-only TLD.
EMAIL = re.compile(r"(?:(?<=mailto:)|(?<![\w.%+:/-]))([A-Za-z0-9][A-Za-z0-9._%+-]*)@"
                   r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))(?![\w-]|\.\w)")
DOC_TLDS = {"test", "example", "invalid", "localhost", "local"}
FILE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "js", "mjs", "ts", "css", "scss", "py",
                   "json", "html", "htm", "md", "txt", "xml", "yaml", "yml", "pdf", "zip", "gz"}
# Not after a hyphen either: "section-4.7.1.1", "pkg-1.2.3.4" are section and version numbers.
IPV4 = re.compile(r"(?<![\w.-])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?!\w|\.\w)")
# Version context right before a dotted quad; a plain "=" is an assignment, not a version pin.
VERSION_BEFORE = re.compile(r"(?:\bv|\bversion|\bver|\brelease|==|>=|<=|~=|!=|\^|~)\s*[:=]?\s*[\"']?$",
                            re.IGNORECASE)
PUBLIC_DNS = {"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112", "208.67.222.222",
              "208.67.220.220", "4.2.2.2", "4.2.2.1"}


@dataclass(frozen=True)
class Hit:
    start: int
    end: int
    kind: str  # one of KINDS
    source: str  # "detect-secrets:<secret type>" or "regex:<name>"


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
    return tuple(getattr(modules[name], cls)() for name, cls in DETECT_SECRETS_PLUGINS)


def _detect_secrets_hits(text: str) -> list[Hit]:
    """Runs the plugins' ``analyze_string`` on each line (the unit detect-secrets scans); it yields
    secret values, located again in the line. Called directly rather than through ``scan_line``,
    which goes through detect-secrets' process-wide settings and filters."""
    plugins = detect_secrets_plugins()
    hits = []
    offset = 0
    for line in text.splitlines(keepends=True):
        for plugin in plugins:
            for value in set(plugin.analyze_string(line)):
                value = value.strip()
                if not value:
                    continue
                # A Basic-auth password can be short and common ("pass"): only its place in the URL.
                if plugin.secret_type == "Basic Auth Credentials":
                    pattern = re.compile(r"(?<=:)" + re.escape(value) + r"(?=@)")
                else:
                    pattern = re.compile(re.escape(value))
                for m in pattern.finditer(line):
                    hits.append(Hit(offset + m.start(), offset + m.end(), "secret",
                                    f"detect-secrets:{plugin.secret_type}"))
        offset += len(line)
    return hits


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


def find_hits(text: str) -> list[Hit]:
    """All redactions for the text, non-overlapping, in order. Where hits overlap the one of the
    higher-priority kind (KINDS order), then the longer, wins; detect-secrets before our regex."""
    hits = [Hit(m.start(), m.end(), "private_key", "regex:pem") for m in PRIVATE_KEY.finditer(text)]
    hits += _detect_secrets_hits(text)
    hits += [Hit(m.start(), m.end(), "secret", f"regex:{name}") for name, regex in TOKENS.items()
             for m in regex.finditer(text)]
    hits += [Hit(m.start(), m.end(), "email", "regex:email") for m in EMAIL.finditer(text)
             if not _email_kept(*m.groups())]
    hits += [Hit(m.start(), m.end(), "ip_address", "regex:ipv4") for m in IPV4.finditer(text)
             if not _ip_kept(text, m)]
    chosen: list[Hit] = []
    for hit in sorted(hits, key=lambda h: (KINDS.index(h.kind), h.start - h.end,
                                           not h.source.startswith("detect-secrets"))):
        if all(hit.end <= c.start or hit.start >= c.end for c in chosen):
            chosen.append(hit)
    return sorted(chosen, key=lambda h: h.start)


def redact(text: str, hits: list[Hit] | None = None) -> tuple[str, list[Hit]]:
    """The text with every hit replaced by its placeholder, and the hits."""
    hits = find_hits(text) if hits is None else hits
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
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, hits = redact(doc.text)
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
        if hits:
            self.stat_update("redacted_files")
            doc.text = text
        return True
