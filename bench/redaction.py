"""Secrets redaction: recall per rule, false positives per MB, speed against today's redactor.

    python bench/redaction.py [--samples 20] [--site-packages 1200] [--reference e726e65] [--seed 0]

* **Recall per rule**: for every rule (gitleaks' rules as vendored, our own token regexes, the
  detect-secrets plugins' patterns, and credentials named by their variable), fake values of the
  rule's documented shape are generated from its own regex (a small generator over the regex's
  parse tree; handwritten templates where the rule needs its surroundings: PEM blocks, curl
  commands, Kubernetes secrets, Terraform, nuget.config, webhook URLs) and must pass the rule's own
  entropy and allowlists. None is a live credential. Each is planted, ``--samples`` times, in a
  window of 20-60 lines of a real standard-library file, in six contexts: an assignment, a call
  argument, a dict, an env file line, YAML and a URL query parameter (the name carries the rule's
  keyword, e.g. ``GOCARDLESS_API_TOKEN``). Redacted = the value is gone from the output. ``n/a``:
  the context does not fit the rule (a webhook URL is not a query parameter, a Terraform password
  lives in .tf files). ``today``: the same for the first 3 samples of each context with today's
  redactor. ``rule alone``: for gitleaks' rules, how many the rule itself finds (the others are
  caught by another source, mostly the credential-name rule).
* **False positives**: secret redactions per MB on the standard library (every ``.py`` file, tests
  included: ~1,800 files, ~31 MB, no real credentials) and on a sample of site-packages
  (``--site-packages`` files), by rule, new and today.
* **Speed**: MB/s of ``find_hits`` on the standard library, new and today's (``--reference``: the
  commit before the gitleaks rules; its redaction.py is loaded from git as a separate module), one
  process, the two timed file by file in alternating order in the same run (a shared machine's load
  hits both alike). Goals: recall >= 99% per rule and context, <= 0.5 false secrets per MB,
  speed >= 0.8x today's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from datatrove_pipelines import redaction as R, secret_rules as S  # noqa: E402

try:
    from re import _constants as C, _parser as P  # Python >= 3.11
except ImportError:  # pragma: no cover
    import sre_constants as C
    import sre_parse as P

REFERENCE = "e726e65fa145f4e338b33c9d58f738fe5c19190c"  # the last commit before issue 36
CONTEXTS = ("assignment", "call argument", "dict", "env file", "YAML", "URL")
TEMPLATES = {
    "assignment": ("app/settings.py", '{NAME} = "{value}"'),
    "call argument": ("app/client.py", 'client = connect({name}="{value}", timeout=30)'),
    "dict": ("app/config.py", 'CONFIG = {{"{name}": "{value}", "retries": 3}}'),
    "env file": (".env", "{NAME}={value}"),
    "YAML": ("deploy/config.yaml", "{name}: {value}"),
    "URL": ("app/fetch.py", 'URL = "https://api.example.com/v1/items?{name}={value}&page=2"'),
}
KEY_BODY_CHARS = string.ascii_letters + string.digits + "+/"
GEN_FAILED = "no value could be generated"


# ------------------------------------------------------------------ values from a regex
class Generator:
    """Random strings matching a Python regex: a walk over its parse tree. Repeats are drawn in
    [min, min + 24] inside the secret's group and at their minimum outside it (the context around
    a secret is written by the templates, not by the regex)."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd

    def __call__(self, pattern: str, flags: int = 0, secret_group: int | None = None) -> str:
        self.groups: dict[int, str] = {}
        self.secret_group = secret_group
        return self.seq(P.parse(pattern, flags), bool(flags & re.IGNORECASE), False)

    def seq(self, items, ic, inside) -> str:
        return "".join(self.item(op, av, ic, inside) for op, av in items)

    def chars(self, av, ic) -> list[str]:
        chosen, negate = set(), False
        for op, a in av:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                chosen.add(chr(a))
            elif op is C.RANGE:
                chosen.update(chr(c) for c in range(a[0], min(a[1], 0x7e) + 1))
            elif op is C.CATEGORY:
                chosen.update({C.CATEGORY_DIGIT: string.digits, C.CATEGORY_WORD: string.ascii_letters + string.digits + "_",
                               C.CATEGORY_SPACE: " "}.get(a, ""))
                if a in (C.CATEGORY_NOT_DIGIT, C.CATEGORY_NOT_WORD, C.CATEGORY_NOT_SPACE):
                    chosen.update({C.CATEGORY_NOT_DIGIT: string.ascii_letters, C.CATEGORY_NOT_WORD: "-",
                                   C.CATEGORY_NOT_SPACE: string.ascii_letters + string.digits}[a])
        if ic:
            chosen |= {c.swapcase() for c in chosen}
        if negate:
            chosen = set(string.ascii_letters + string.digits) - chosen
        return sorted(c for c in chosen if c.isprintable()) or ["a"]

    def item(self, op, av, ic, inside) -> str:
        rnd = self.rnd
        if op is C.LITERAL:
            return chr(av)
        if op is C.NOT_LITERAL:
            return rnd.choice([c for c in string.ascii_letters + string.digits if c != chr(av)])
        if op is C.ANY:  # an unescaped '.' of a host name outside the secret (hooks.slack.com)
            return rnd.choice(string.ascii_letters + string.digits) if inside else "."
        if op is C.IN:
            return rnd.choice(self.chars(av, ic))
        if op is C.CATEGORY:
            return rnd.choice(self.chars([(op, av)], ic))
        if op is C.BRANCH:
            return self.seq(rnd.choice(av[1]), ic, inside)
        if op is C.SUBPATTERN:
            group, add, delete, sub = av
            ic = (ic or bool(add & re.IGNORECASE)) and not delete & re.IGNORECASE
            here = inside or (group is not None and (self.secret_group is None or group == self.secret_group))
            if group is not None and self.secret_group is None:
                self.secret_group = group  # the first group is the secret unless secretGroup says
            text = self.seq(sub, ic, here)
            if group is not None:
                self.groups[group] = text
            return text
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            hi = lo + 24 if hi == C.MAXREPEAT else hi
            n = rnd.randint(lo, min(hi, lo + 24)) if inside else lo
            return "".join(self.seq(sub, ic, inside) for _ in range(n))
        if op is C.GROUPREF:
            return self.groups.get(av, "")
        return ""  # AT, ASSERT, ASSERT_NOT: zero-width


def keyword_name(rule) -> str:
    """A name for the planted variable that holds one of the rule's keywords (the file-level
    prefilter: a real file with such a token names its vendor somewhere), else the rule's vendor."""
    for k in rule.keywords:
        if re.fullmatch(r"[a-z][a-z0-9]{2,}", k):
            return k
    return re.sub(r"[^a-z0-9]+", "_", rule.id.split("-")[0])


def variable_name(prefix: str, fallback: str) -> str:
    """The planted variable's name from what the regex wants before the secret (its keyword and an
    operator): ``gocardless=>`` -> ``gocardless_api_token``, ``CO_API_KEY=`` -> ``co_api_key``."""
    base = prefix.rstrip(" \t'\"`=:>,|?").strip() or fallback
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).lower()
    return base if re.search(r"(?:key|token|secret)$", base) else base + "_api_token"


def generated_secret(rule, gen: Generator, tries: int = 200):
    """(value, prefix) of a fake secret for a gitleaks rule: generated, then found by the rule itself
    with its entropy and allowlists, in the generated text and planted as an assignment (the
    prefix: what the regex wants before it, e.g. its keyword)."""
    path = PATHS.get(rule.id, "x") if rule.path is not None else None

    def own(text):
        return [h for h in S.gitleaks_hits(text, S.gitleaks_rules().words.find(S.lowercase(text)), path)
                if h.source == f"gitleaks:{rule.id}"]

    for _ in range(tries):
        full = keyword_name(rule) + " = 1\n" + gen(rule.regex.pattern, rule.regex.flags, rule.secret_group or None)
        found = own(full)
        if found and "\n" not in full[found[0].start:found[0].end]:
            value, prefix = full[found[0].start:found[0].end], full[full.index("\n") + 1:found[0].start]
            name = variable_name(prefix, keyword_name(rule))
            if own(TEMPLATES["assignment"][1].format(NAME=name.upper(), value=value)):
                return value, prefix
    return None, None


def generated_match(regex: re.Pattern, gen: Generator, group: bool = False, tries: int = 200):
    """(value, prefix): a match of the regex (its first group when ``group``), delimiters stripped."""
    for _ in range(tries):
        full = gen(regex.pattern, regex.flags, 1 if group else None)
        m = regex.search(full)
        if m:
            start, end = m.span(1) if group else m.span()
            value = full[start:end].strip(" \t\n=:\"'")
            if value:
                return value, full[:full.index(value, start)]
    return None, None


# ------------------------------------------------------------------ rules that need their surroundings
PATHS = {"hashicorp-tf-password": "infra/main.tf", "kubernetes-secret-yaml": "deploy/secret.yaml",
         "nuget-config-password": "nuget.config"}


def pem_block(rnd: random.Random, label: str = "RSA ") -> tuple[str, list[str]]:
    body = ["".join(rnd.choice(KEY_BODY_CHARS) for _ in range(64)) for _ in range(rnd.randint(6, 12))]
    return f"-----BEGIN {label}PRIVATE KEY-----", body


def special_plants(rule_id: str, rnd: random.Random, gen: Generator):
    """{context: (path, text, value)} for the rules whose value needs its surroundings, or None."""
    def tok(n=32, alphabet=string.ascii_letters + string.digits):
        return "".join(rnd.choice(alphabet) for _ in range(n))

    if rule_id in ("private-key", "regex:pem"):
        label = rnd.choice(["RSA ", "EC ", "OPENSSH ", "", "DSA ", "ENCRYPTED "])
        begin, body = pem_block(rnd, label)
        end = begin.replace("BEGIN", "END")
        value = body[2]
        escaped = "\\n".join([begin, *body, end])
        block = "\n".join([begin, *body, end])
        return {"assignment": ("app/keys.py", f'PRIVATE_KEY = """{block}"""', value),
                "call argument": ("app/keys.py", f'key = load_pem_private_key(b"""{block}""", password=None)', value),
                "dict": ("app/keys.py", f'CREDENTIALS = {{"private_key": "{escaped}", "client_email": "bot"}}', value),
                "env file": (".env", f'PRIVATE_KEY="{escaped}"', value),
                "YAML": ("deploy/config.yaml", "private_key: |\n" + "\n".join("  " + x for x in [begin, *body, end]), value),
                "URL": None}
    if rule_id == "kubernetes-secret-yaml":
        value = tok(24, string.ascii_letters + string.digits + "+/") + "=="
        doc = f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: app-credentials\ntype: Opaque\ndata:\n  api-token: {value}\n"
        return {c: (PATHS[rule_id], doc, value) if c == "YAML" else None for c in CONTEXTS}
    if rule_id == "hashicorp-tf-password":
        value = tok(14, string.ascii_lowercase + string.digits)
        return {c: (PATHS[rule_id], f'resource "azurerm_sql_server" "main" {{\n  administrator_login_password = "{value}"\n}}',
                    value) if c == "assignment" else None for c in CONTEXTS}
    if rule_id == "nuget-config-password":
        value = tok(20)
        xml = ("<packageSourceCredentials>\n  <feed>\n    <add key=\"Username\" value=\"ci\" />\n"
               f'    <add key="ClearTextPassword" value="{value}" />\n  </feed>\n</packageSourceCredentials>')
        return {c: (PATHS[rule_id], xml, value) if c == "dict" else None for c in CONTEXTS}
    if rule_id in ("curl-auth-header", "curl-auth-user"):
        if rule_id == "curl-auth-header":
            value = tok(40)
            cmd = f'curl -H "Authorization: Bearer {value}" https://api.example.com/v1/items'
        else:
            value = "deploy:" + rnd.choice(string.ascii_uppercase) + tok(15)  # gitleaks allows "user:x...", "user:test..."
            cmd = f'curl -u "{value}" https://api.example.com/v1/items'
        return {"assignment": ("scripts/deploy.py", f"CMD = '{cmd}'", value),
                "call argument": ("scripts/deploy.py", f"subprocess.run('{cmd}', shell=True, check=True)", value),
                "dict": ("scripts/deploy.py", f"STEPS = {{'fetch': '{cmd}'}}", value),
                "env file": None, "YAML": (".github/workflows/ci.yaml", f"run: {cmd}", value), "URL": None}
    if rule_id == "sidekiq-sensitive-url":
        value = tok(8, "0123456789abcdef") + ":" + tok(8, "0123456789abcdef")
        url = f"https://{value}@gems.contribsys.com/"
        return {"assignment": ("Gemfile.py", f'SOURCE = "{url}"', value),
                "call argument": ("Gemfile.py", f'source("{url}", gems=["sidekiq-pro"])', value),
                "dict": ("Gemfile.py", f'SOURCES = {{"sidekiq": "{url}"}}', value),
                "env file": (".env", f"BUNDLE_SOURCE={url}", value),
                "YAML": ("deploy/config.yaml", f"gem_source: {url}", value), "URL": None}
    if rule_id == "ds:BasicAuthDetector/0":
        value = tok(rnd.randint(10, 20), string.ascii_letters + string.digits + "-_.~")
        return {"assignment": ("app/settings.py", f'DATABASE_URL = "postgres://admin:{value}@db.internal:5432/app"', value),
                "call argument": ("app/db.py", f'engine = create_engine("mysql://root:{value}@db.internal/app", echo=False)', value),
                "dict": ("app/celery.py", f'CONFIG = {{"broker_url": "amqp://worker:{value}@rabbit:5672//"}}', value),
                "env file": (".env", f"DATABASE_URL=postgres://admin:{value}@db.internal:5432/app", value),
                "YAML": ("deploy/config.yaml", f"cache_url: redis://default:{value}@cache:6379/0", value),
                "URL": ("app/fetch.py", f'REPO = "https://deploy:{value}@git.internal/org/repo.git"', value)}
    if rule_id == "ds:NpmDetector/0":
        value = "npm_" + tok(36)
        line = f"//registry.npmjs.org/:_authToken={value}"
        return {c: (".npmrc", line, value) if c == "env file" else None for c in CONTEXTS}
    if rule_id == "freemius-secret-key":
        value = "sk_" + tok(29, string.ascii_letters + string.digits + "-_.")
        out = {}
        for c in CONTEXTS:
            path, template = TEMPLATES[c]
            out[c] = (path, template.format(name="secret_key", NAME="SECRET_KEY", value=value), value)
        out["dict"] = ("config.php", f"$config = array('secret_key' => '{value}', 'debug' => false);", value)
        return out
    return None


# ------------------------------------------------------------------ the rules under test
def rules_under_test(rnd: random.Random):
    """[(rule name, family, make)]: make(rnd) -> {context: (path, snippet, value) or None}."""
    gen = Generator(rnd)
    rules = []

    def plain(value_and_prefix, fallback):
        def make(rnd):
            value, prefix = value_and_prefix()
            if value is None:
                return None
            name = variable_name(prefix, fallback)
            out = {}
            for c in CONTEXTS:
                path, template = TEMPLATES[c]
                if c == "URL" and "://" in value:
                    out[c] = None
                    continue
                out[c] = (path, template.format(name=name, NAME=name.upper(), value=value), value)
            return out
        return make

    for rule in S.gitleaks_rules().rules:
        if special_plants(rule.id, rnd, gen) is not None:
            rules.append((rule.id, "gitleaks", lambda rnd, rid=rule.id: special_plants(rid, rnd, gen)))
        else:
            rules.append((rule.id, "gitleaks", plain(lambda rule=rule: generated_secret(rule, gen), keyword_name(rule))))
    for name, regex in S.TOKENS.items():
        rules.append((f"regex:{name}", "ours", plain(lambda regex=regex: generated_match(regex, gen), name.split("_")[0])))
    rules.append(("regex:pem", "ours", lambda rnd: special_plants("regex:pem", rnd, gen)))
    for plugin in R.detect_secrets_plugins():
        for i, regex in enumerate(plugin.denylist):
            rid = f"ds:{type(plugin).__name__}/{i}"
            if plugin.secret_type == "JSON Web Token":
                continue  # a JWT's parts are base64 JSON that it decodes: covered by jwt and regex:jwt
            if special_plants(rid, rnd, gen) is not None:
                rules.append((rid, "detect-secrets", lambda rnd, rid=rid: special_plants(rid, rnd, gen)))
                continue
            group = plugin.secret_type == "AWS Access Key" and regex.groups > 0  # aws ... key ... "<40>"
            vendor = re.sub(r"(?:Token|Key|OAuth|Bot)*Detector$", "", type(plugin).__name__).lower()
            rules.append((rid, "detect-secrets", plain(lambda regex=regex, group=group: generated_match(regex, gen, group),
                                                       vendor)))

    # Credentials named by their variable: HF, W&B, generic tokens and passwords (handwritten shapes).
    def named(names, value_fn, contexts=None):
        def make(rnd):
            value, name = value_fn(rnd), rnd.choice(names)
            out = {}
            for c in CONTEXTS:
                path, template = TEMPLATES[c]
                out[c] = (path, template.format(name=name.lower(), NAME=name.upper(), value=value), value)
            return out
        return make

    hex40 = lambda rnd: "".join(rnd.choice("0123456789abcdef") for _ in range(40))  # noqa: E731
    hf = lambda rnd: "hf_" + "".join(rnd.choice(string.ascii_letters) for _ in range(34))  # noqa: E731
    b62 = lambda rnd: "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(rnd.randint(24, 48)))  # noqa: E731

    def password(rnd):
        pools = [string.ascii_lowercase, string.ascii_uppercase, string.digits, "!#%*+-_.@^~"]
        chars = [rnd.choice(p) for p in pools] + [rnd.choice("".join(pools)) for _ in range(rnd.randint(6, 14))]
        rnd.shuffle(chars)
        return "".join(chars).lstrip("#")  # unquoted, a leading '#' starts a comment (YAML) or a fragment (URL)

    rules += [("credential: WANDB_API_KEY (40 hex)", "credential", named(["wandb_api_key"], hex40)),
              ("credential: key= (W&B login, 40 hex)", "credential", named(["key"], hex40)),
              ("credential: HF_TOKEN (hf_ + 34 letters)", "credential", named(["hf_token", "token"], hf)),
              ("credential: *_API_KEY/*_TOKEN/*_SECRET (base62)", "credential",
               named(["openrouter_api_key", "service_token", "client_secret", "api_key", "auth_token"], b62)),
              ("credential: password", "credential", named(["password", "db_password", "smtp_passwd"], password))]
    return rules


# ------------------------------------------------------------------ corpora and the reference
def reference_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:datatrove_pipelines/redaction.py"], cwd=ROOT, capture_output=True,
                         text=True)
    if src.returncode:
        raise SystemExit(f"git show {rev}:datatrove_pipelines/redaction.py failed: {src.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(prefix="bench_redaction_"), "redaction_reference.py")
    with open(path, "w") as f:
        f.write(src.stdout)
    spec = importlib.util.spec_from_file_location("redaction_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return module


def read(paths) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        try:
            out.append((str(p), p.read_text(encoding="utf-8", errors="replace")))
        except (UnicodeDecodeError, OSError):
            pass
    return out


def windows(texts, rnd: random.Random):
    """A random window of 20-60 lines of a random file (real code around a planted value)."""
    lines = texts[rnd.randrange(len(texts))][1].splitlines(keepends=True)
    n = rnd.randint(20, 60)
    start = rnd.randrange(max(1, len(lines) - n))
    return lines[start:start + n]


def plant(host: list[str], snippet: str, rnd: random.Random) -> str:
    i = rnd.randint(0, len(host))
    return "".join(host[:i]) + ("\n" if i and not host[i - 1].endswith("\n") else "") + snippet + "\n" + "".join(host[i:])


# ------------------------------------------------------------------ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20, help="values per rule and context")
    p.add_argument("--reference-samples", type=int, default=3, help="of those, run through today's redactor too")
    p.add_argument("--site-packages", type=int, default=1200, help="site-packages files for the false positives")
    p.add_argument("--reference", default=REFERENCE, help="git revision of today's redactor")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from megatron_seed.data.stdlib_corpus import site_packages_files, stdlib_files
    from megatron_seed.platform.precision import cpu_description

    t_start = time.perf_counter()
    old = reference_module(args.reference)
    t0 = time.perf_counter()
    S.gitleaks_rules()
    R._detect_secrets_plan()
    compile_s = time.perf_counter() - t0
    old.find_hits("x = 1\n")
    stdlib = read(stdlib_files(include_tests=True))
    site = read(site_packages_files(args.site_packages))
    rnd = random.Random(args.seed)
    info = R.rule_set_info()

    # Recall.
    rows = []
    for rule_id, family, make in rules_under_test(rnd):
        got = {c: [0, 0] for c in CONTEXTS}
        today = {c: [0, 0] for c in CONTEXTS}
        alone = {c: [0, 0] for c in CONTEXTS}  # found by this gitleaks rule itself
        missing = Counter()
        failed = False
        for k in range(args.samples):
            plants = make(rnd)
            if plants is None:
                failed = True
                break
            for c in CONTEXTS:
                if plants.get(c) is None:
                    continue
                path, snippet, value = plants[c]
                text = plant(windows(stdlib, rnd), snippet, rnd)
                redacted = value not in R.redact(text, path=path)[0]
                got[c][0] += redacted
                got[c][1] += 1
                if not redacted:
                    missing[c] += 1
                if family == "gitleaks":
                    at = text.index(value)
                    own = S.gitleaks_hits(text, S.gitleaks_rules().words.find(S.lowercase(text)), path)
                    alone[c][0] += any(h.source == f"gitleaks:{rule_id}" and h.start <= at < h.end for h in own)
                    alone[c][1] += 1
                if k < args.reference_samples:
                    today[c][0] += value not in old.redact(text)[0]
                    today[c][1] += 1
        rows.append((rule_id, family, got, today, failed, alone))
    recall_s = time.perf_counter() - t_start

    # Speed and false positives on the standard library, new and today, alternating.
    fp = {"stdlib": (Counter(), Counter()), "site-packages": (Counter(), Counter())}
    seconds = {"new": 0.0, "today": 0.0}
    sizes = {corpus: sum(len(t.encode()) for _, t in texts) / 1e6
             for corpus, texts in (("stdlib", stdlib), ("site-packages", site))}
    for corpus, texts in (("stdlib", stdlib), ("site-packages", site)):
        for i, (path, text) in enumerate(texts):
            order = (("new", R.find_hits), ("today", old.find_hits))
            if i % 2 == 0:
                order = order[::-1]
            for side, fn in order:
                t = time.perf_counter()
                hits = fn(text)
                dt = time.perf_counter() - t
                if corpus == "stdlib":
                    seconds[side] += dt
                counter = fp[corpus][0 if side == "new" else 1]
                for h in hits:
                    if h.kind in ("secret", "private_key"):
                        counter[h.source] += 1

    # The report.
    cores = os.cpu_count()
    print(f"\nbench/redaction.py | {cpu_description()}, {cores} cores | Python {sys.version.split()[0]} | "
          f"rule set {info['name']} {info['version']} ({info['rules_used']} of {info['rules']} rules run; skipped: "
          f"{', '.join(f'{k} ({v})' for k, v in info['rules_skipped'].items()) or 'none'}) | detect-secrets "
          f"{info['detect_secrets']} | today = {args.reference[:10]} | rule compile {compile_s:.2f} s")
    print(f"\n## Recall per rule: {args.samples} planted values per context (today: the first "
          f"{args.reference_samples}), redacted = value gone\n")
    print("| rule | source | " + " | ".join(CONTEXTS) + " | min | today min | rule alone min |")
    print("|---|---|" + "---|" * (len(CONTEXTS) + 3))
    below = []
    for rule_id, family, got, today, failed, alone in rows:
        if failed:
            print(f"| {rule_id} | {family} | " + " | ".join(["gen failed"] * len(CONTEXTS)) + " | - | - | - |")
            below.append((rule_id, GEN_FAILED))
            continue
        cells, values, tvalues = [], [], []
        for c in CONTEXTS:
            ok, n = got[c]
            if not n:
                cells.append("n/a")
                continue
            values.append(ok / n)
            cells.append(f"{100 * ok / n:.0f}")
            if today[c][1]:
                tvalues.append(today[c][0] / today[c][1])
        low = min(values) if values else None
        avalues = [alone[c][0] / alone[c][1] for c in CONTEXTS if alone[c][1]]
        print(f"| {rule_id} | {family} | " + " | ".join(cells) + f" | {100 * low:.0f} | "
              + (f"{100 * min(tvalues):.0f}" if tvalues else "-") + " | "
              + (f"{100 * min(avalues):.0f}" if avalues else "-") + " |")
        if low is not None and low < 0.99:
            below.append((rule_id, ", ".join(f"{c} {100 * got[c][0] / got[c][1]:.0f}%" for c in CONTEXTS
                                             if got[c][1] and got[c][0] / got[c][1] < 0.99)))
    done = [r for r in rows if not r[4]]
    total = sum(r[2][c][1] for r in done for c in CONTEXTS)
    hit = sum(r[2][c][0] for r in done for c in CONTEXTS)
    ttotal = sum(r[3][c][1] for r in done for c in CONTEXTS)
    thit = sum(r[3][c][0] for r in done for c in CONTEXTS)
    atotal = sum(r[5][c][1] for r in done for c in CONTEXTS)
    ahit = sum(r[5][c][0] for r in done for c in CONTEXTS)
    print(f"\ngitleaks values found by their own rule: {100 * ahit / max(atotal, 1):.2f}% of {atotal} (the rest by "
          f"another source: a credential name, a format rule of ours or of detect-secrets)")
    print(f"all planted values: new {100 * hit / total:.2f}% of {total}; today {100 * thit / max(ttotal, 1):.2f}% "
          f"of {ttotal}. Rules at >= 99% in every context: {len(done) - sum(b[1] != GEN_FAILED for b in below)}"
          f" of {len(done)}")
    for rule_id, why in below:
        print(f"  below 99%: {rule_id}: {why}")

    print("\n## False positives: secret redactions per MB (no real credentials in these corpora)\n")
    print("| corpus | MB | files | new | new / MB | today | today / MB |\n|---|---|---|---|---|---|---|")
    for corpus in fp:
        new, ref = fp[corpus]
        files = len(stdlib if corpus == "stdlib" else site)
        print(f"| {corpus} | {sizes[corpus]:.1f} | {files} | {sum(new.values())} | {sum(new.values()) / sizes[corpus]:.2f} | "
              f"{sum(ref.values())} | {sum(ref.values()) / sizes[corpus]:.2f} |")
    print("\nby rule (new | today):")
    for corpus in fp:
        new, ref = fp[corpus]
        for source in sorted(set(new) | set(ref)):
            print(f"  {corpus:13s} {source:48s} {new[source]:4d} | {ref[source]:4d}")

    print("\n## Speed: find_hits on the standard library, one process, alternating file by file\n")
    mb = sizes["stdlib"]
    print("| redactor | seconds | MB/s |\n|---|---|---|")
    for side in ("today", "new"):
        print(f"| {side} | {seconds[side]:.1f} | {mb / seconds[side]:.2f} |")
    print(f"\nnew / today MB/s = {seconds['today'] / seconds['new']:.2f}x (goal >= 0.8x); "
          f"false secrets per MB: stdlib {sum(fp['stdlib'][0].values()) / mb:.2f}, site-packages "
          f"{sum(fp['site-packages'][0].values()) / sizes['site-packages']:.2f} (goal <= 0.5); "
          f"recall phase {recall_s:.0f} s, whole run {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
