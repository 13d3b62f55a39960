"""Secrets and PII redaction (datatrove_pipelines/redaction.py and secret_rules.py): planted
secrets per language, look-alikes kept, a mostly-secret file dropped, stats and metadata counts;
the vendored gitleaks rule set (version, conversion, skipped rules), each format family in six
contexts, credentials named by their variable (Hugging Face, W&B, passwords), placeholders kept,
the detect-secrets line gate, and curate's reader + redaction step + stats.json."""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import string
from argparse import Namespace

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("detect_secrets")

from datatrove.data import Document  # noqa: E402

from datatrove_pipelines import redaction, secret_rules  # noqa: E402
from datatrove_pipelines.redaction import SecretRedactor, find_hits, redact, rule_set_info  # noqa: E402
from datatrove_pipelines.secret_rules import (RULE_SET, RULES_DIR, credential_hits, gitleaks_hits,  # noqa: E402
                                              gitleaks_rules, go_to_python, lowercase)

# Made-up values in the real formats (none is a live credential).
AWS_ID = "AKIAQ3EGRTXHZ7LWMN4P"
AWS_SECRET = "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"
GITHUB = "ghp_R4nd0mT0k3nV4lu3F0rT3st1ngOnly123456"
SLACK = "xoxb-918273645012-5647382910123-QwErTyUiOpAsDfGhJkLzXcVb"
STRIPE = "sk_live_4eC39HqLyjWDarjtT1zdp7dc9Xy2"
OPENAI = "sk-proj-Zx81Lq0Pw92Mn73Bv64Cx55Az46Sy37Dt28"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI5ODc2NTQzMjEwIiwibmFtZSI6IkphbmUifQ."
       "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5")
PASSWORD = "Tr0ub4dor3x"
KEY_BODY = "\n".join(["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"] * 6)
PRIVATE_KEY = f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n-----END RSA PRIVATE KEY-----"

PLANTED = {
    "python": (f'import boto3\n\nclient = boto3.client("s3", aws_access_key_id="{AWS_ID}",\n'
               f'                      aws_secret_access_key="{AWS_SECRET}")\n'
               f'AUTHOR = "Jane Roe <jane.roe@acme-widgets.io>"\nSERVER = "93.184.216.34"\n',
               {AWS_ID: "<SECRET>", AWS_SECRET: "<SECRET>", "jane.roe@acme-widgets.io": "<EMAIL>",
                "93.184.216.34": "<IP_ADDRESS>"}),
    "javascript": ("// clients for the deployment scripts\n"
                   f'const octokit = new Octokit({{ auth: "{GITHUB}" }});\nconst stripe = require("stripe")("{STRIPE}");\n'
                   f'const db = "postgres://admin:{PASSWORD}@db.acme-widgets.io:5432/app";\n'
                   f'const token = "{JWT}";\n',
                   {GITHUB: "<SECRET>", STRIPE: "<SECRET>", PASSWORD: "<SECRET>", JWT: "<SECRET>"}),
    "env": ("# settings of the staging deployment; copy to .env.local and fill in your own values\n"
            "# (the values below belong to the shared staging account and are rotated monthly)\n"
            f"SLACK_TOKEN={SLACK}\nOPENAI_API_KEY={OPENAI}\nADMIN_EMAIL=ops-team@acme-widgets.io\n"
            f"DEPLOY_HOST=52.14.201.7\n",
            {SLACK: "<SECRET>", OPENAI: "<SECRET>", "ops-team@acme-widgets.io": "<EMAIL>",
             "52.14.201.7": "<IP_ADDRESS>"}),
    "go": (f'package main\n\nconst key = `{PRIVATE_KEY}`\n\nfunc main() {{\n\tdial("151.101.1.69:443")\n'
           f'\tprintln("done")\n\tprintln("done")\n\tprintln("done")\n\tprintln("done")\n\tprintln("done")\n}}\n'
           + "// padding so that the key is not most of the file\n" * 10,
           {KEY_BODY.splitlines()[0]: "<PRIVATE_KEY>", "151.101.1.69": "<IP_ADDRESS>"}),
    "shell": (f'#!/bin/sh\nexport AWS_ACCESS_KEY_ID={AWS_ID}\ncurl -H "Authorization: token {GITHUB}" '
              f'https://api.github.com/user\nmail -s report dev.lead@acme-widgets.io < out.txt\n',
              {AWS_ID: "<SECRET>", GITHUB: "<SECRET>", "dev.lead@acme-widgets.io": "<EMAIL>"}),
}


@pytest.mark.parametrize("language", sorted(PLANTED))
def test_planted_secrets_are_replaced_by_their_placeholder(language):
    text, expected = PLANTED[language]
    out, hits = redact(text)
    for secret, placeholder in expected.items():
        assert secret not in out, (language, secret)
        assert placeholder in out, (language, placeholder)
    assert len(hits) >= len(expected)
    # Lines without a secret are untouched.
    clean = [line for line in text.splitlines() if not any(secret in line for secret in expected)
             and "PRIVATE KEY" not in line and not line.startswith("MIIE")]
    assert clean and all(line in out.splitlines() for line in clean)


def test_placeholder_takes_the_exact_place_of_the_secret():
    out, _ = redact(PLANTED["javascript"][0])
    assert 'auth: "<SECRET>" }' in out
    assert "postgres://admin:<SECRET>@db.acme-widgets.io:5432/app" in out  # the host is no e-mail
    out, _ = redact(PLANTED["go"][0])
    assert "const key = `<PRIVATE_KEY>`" in out and "PRIVATE KEY" not in out


LOOK_ALIKES = [
    '"integrity": "sha512-v2kDEe57lecTulaDIuNTPy3Ry4gLGJ6Z1O3vE1krgXZNrsQ+LFTGHVxVjcXPs817m6Z7A9/2IX5XNw2nMF6zX5w==",',
    'resolved = "3f786850e387550fdab836ed7e6dc881de23001b"',
    'digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"',
    'ID = "123e4567-e89b-12d3-a456-426614174000"',
    'contact = "user@example.com"  # or foo@example.org, a@b.example.net, admin@localhost, qa@shop.test',
    "git clone git@github.com:acme/widgets.git && cp logo@2x.png dist/",
    'hosts = ["127.0.0.1", "0.0.0.0", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.0.1"]',
    'docs = ["192.0.2.10", "198.51.100.7", "203.0.113.99"]  # RFC 5737',
    'dns = "8.8.8.8"; oid = "1.3.6.1.4.1.311"; not_ip = "300.1.2.3"; see section-4.7.1.1',
    'install pkg==1.2.3.4; release version 2.10.0.1; v5.4.3.2',
    'PEM_HEADER = b"-----BEGIN RSA PRIVATE KEY-----"  # a parser\'s marker, no key',
    "password = get_password()  # a keyword without a secret value",
]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_kept(text):
    out, hits = redact(text)
    assert out == text and hits == [], hits


def test_detect_secrets_itself_finds_what_our_regexes_do_not():
    # An AWS secret access key and a Basic-auth password have no fixed format of their own: only
    # detect-secrets' AWS (keyword + 40 chars) and BasicAuth plugins find them.
    hits = find_hits(PLANTED["python"][0] + PLANTED["javascript"][0])
    sources = {h.source for h in hits}
    assert "detect-secrets:AWS Access Key" in sources
    assert "detect-secrets:Basic Auth Credentials" in sources
    text = PLANTED["python"][0]
    aws_secret = [h for h in find_hits(text) if text[h.start:h.end] == AWS_SECRET]
    assert [h.source for h in aws_secret] == ["detect-secrets:AWS Access Key"]


def test_missing_detect_secrets_fails_with_the_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_detect_secrets(name, *args, **kwargs):
        if name.startswith("detect_secrets"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    redaction.detect_secrets_plugins.cache_clear()
    monkeypatch.setattr("importlib.import_module", lambda name: no_detect_secrets(name))
    try:
        with pytest.raises(ImportError, match="pip install detect-secrets"):
            list(SecretRedactor().run(iter([Document(text="x = 1\n", id="0")])))
    finally:
        monkeypatch.undo()
        redaction.detect_secrets_plugins.cache_clear()


def test_step_redacts_counts_and_drops_mostly_secret_files():
    docs = [Document(text=PLANTED["python"][0], id="py", metadata={}),
            Document(text=PLANTED["env"][0], id="env", metadata={}),
            Document(text="# deploy key\n" + PRIVATE_KEY + "\n", id="key", metadata={}),
            Document(text=LOOK_ALIKES[0] + "\n", id="lock", metadata={})]
    step = SecretRedactor()
    kept = {doc.id: doc for doc in step.run(iter(docs))}
    assert set(kept) == {"py", "env", "lock"}
    stats = {k: v.total for k, v in step.stats.stats.items()}
    assert stats["dropped_mostly_secrets"] == 1
    assert stats["redacted_secret"] == 4 and stats["redacted_email"] == 2 and stats["redacted_ip_address"] == 2
    assert stats["redacted_files"] == 2 and "redacted_private_key" not in stats
    assert kept["py"].metadata == {"redacted_private_key": 0, "redacted_secret": 2, "redacted_email": 1,
                                   "redacted_ip_address": 1}
    assert kept["lock"].text == LOOK_ALIKES[0] + "\n" and kept["lock"].metadata["redacted_secret"] == 0
    assert AWS_ID not in kept["py"].text and SLACK not in kept["env"].text


def test_mostly_secrets_threshold_is_configurable():
    doc = Document(text="# deploy key\n" + PRIVATE_KEY + "\n", id="key", metadata={})
    kept = list(SecretRedactor(max_redacted_fraction=1.0).run(iter([doc])))
    assert len(kept) == 1 and kept[0].text == "# deploy key\n<PRIVATE_KEY>\n"
    assert kept[0].metadata["redacted_private_key"] == 1


def test_ip_rules_on_placeholders_and_version_suffixes():
    text = 'peers = ["2.2.2.2", "1.2.3.4"]; engine = "11.5.9.0.sb00000000.r1"; real = "52.14.201.7."'
    out, hits = redact(text)
    assert [h.kind for h in hits] == ["ip_address"] and out.endswith('real = "<IP_ADDRESS>."')


# ----------------------------------------------------------------------------- issue 36: the rule set
def rand(alphabet: str, n: int, seed: int) -> str:
    import random

    r = random.Random(seed)
    return "".join(r.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
# Made-up values of each family's documented shape (none is a live credential).
HF_TOKEN = "hf_" + rand(string.ascii_letters, 34, 1)
HF_ORG = "api_org_" + rand(string.ascii_letters, 34, 2)
WANDB = rand("0123456789abcdef", 40, 3)
FAMILIES = {  # family: (value, gitleaks rule that finds the bare token, a name it goes by)
    "aws": (AWS_ID, "aws-access-token", "aws_access_key_id"),
    "github": ("ghp_" + rand(ALNUM, 36, 4), "github-pat", "github_token"),
    "github-fine-grained": ("github_pat_" + rand(ALNUM + "_", 82, 5), "github-fine-grained-pat", "gh_pat"),
    "gitlab": ("glpat-" + rand(ALNUM, 20, 6), "gitlab-pat", "gitlab_token"),
    "slack": ("xoxb-" + rand(string.digits, 12, 7) + "-" + rand(string.digits, 12, 8) + "-" + rand(ALNUM, 24, 9),
              "slack-bot-token", "slack_bot_token"),
    "stripe": ("sk_live_" + rand(ALNUM, 24, 10), "stripe-access-token", "stripe_secret_key"),
    "openai": ("sk-proj-" + rand(ALNUM, 58, 11) + "T3BlbkFJ" + rand(ALNUM, 58, 12), "openai-api-key", "openai_api_key"),
    "anthropic": ("sk-ant-api03-" + rand(ALNUM, 93, 13) + "AA", "anthropic-api-key", "anthropic_api_key"),
    "google": ("AIza" + rand(ALNUM, 35, 14), "gcp-api-key", "google_api_key"),
    "huggingface": (HF_TOKEN, "huggingface-access-token", "hf_token"),
    "huggingface-org": (HF_ORG, "huggingface-organization-api-token", "hf_org_token"),
    "sendgrid": ("SG." + rand(ALNUM, 22, 15) + "." + rand(ALNUM, 43, 16), "sendgrid-api-token", "sendgrid_api_key"),
    "npm": ("npm_" + rand(ALNUM, 36, 17), "npm-access-token", "npm_token"),
    "pypi": ("pypi-AgEIcHlwaS5vcmc" + rand(ALNUM, 70, 18), "pypi-upload-token", "pypi_token"),
    "databricks": ("dapi" + rand("0123456789abcdef", 32, 19), "databricks-api-token", "databricks_token"),
    "twilio": ("SK" + rand("0123456789abcdef", 32, 20), "twilio-api-key", "twilio_api_key"),
    "jwt": (JWT, "jwt", "id_token"),
}
CONTEXT_TEMPLATES = {
    "assignment": '{NAME} = "{value}"',
    "call argument": 'client = connect({name}="{value}", timeout=30)',
    "dict": 'CONFIG = {{"{name}": "{value}", "retries": 3}}',
    "env file": "{NAME}={value}",
    "YAML": "{name}: {value}",
    "URL": 'URL = "https://api.acme-widgets.io/v1/items?{name}={value}&page=2"',
}
HOST = 'import os\n\n\ndef fetch(url):\n    """Fetch the items."""\n    return url\n'


def test_the_vendored_rule_set_is_gitleaks_at_its_recorded_version():
    data = (RULES_DIR / RULE_SET["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == RULE_SET["sha256"], "rules/gitleaks.toml changed: update RULE_SET"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", RULE_SET["version"]) and RULE_SET["name"] == "gitleaks"
    notice = (RULES_DIR / "NOTICE").read_text()
    assert RULE_SET["version"] in notice and RULE_SET["commit"] in notice
    assert "MIT License" in (RULES_DIR / "LICENSE-gitleaks").read_text()
    rules = gitleaks_rules()
    assert rules.total == 222 and len(rules.rules) == 221
    assert rules.skipped == {"pkcs12-file": "path-only rule (a file name, not text)"}
    info = rule_set_info()
    assert (info["name"], info["version"], info["rules"], info["rules_used"]) == ("gitleaks", RULE_SET["version"], 222, 221)
    by_id = {r.id: r for r in rules.rules}
    # Keywords, secretGroup, entropy, allowlists and paths are read from the file.
    assert by_id["huggingface-access-token"].keywords == ("hf_",) and by_id["huggingface-access-token"].entropy == 2
    assert by_id["sonar-api-token"].secret_group == 2
    assert by_id["kubernetes-secret-yaml"].path is not None
    assert len(by_id["generic-api-key"].allowlists) >= 3 and by_id["generic-api-key"].extend_left


@pytest.mark.parametrize("go, text, matches", [
    (r"a(?i)b|c", "aB", True), (r"a(?i)b|c", "C", True), (r"a(?i)b|c", "AB", False),
    (r"\b(p8e-(?i)[a-z0-9]{4})\b", "p8e-AbC1", True), (r"\b(p8e-(?i)[a-z0-9]{4})\b", "P8E-abc1", False),
    (r"x(?:y(?i)z)w", "xyZw", True), (r"x(?:y(?i)z)w", "xyzW", False),
    (r"pat[[:alnum:]]{3}", "patA1b", True), (r"pat[[:alnum:]]{3}", "pat_1b", False),
    (r"end\z", "end", True), (r"[a&&b]", "&", True),
])
def test_go_regexes_are_converted_with_their_meaning(go, text, matches):
    assert bool(re.fullmatch(go_to_python(go), text)) is matches


def test_a_rule_that_cannot_be_converted_is_skipped_and_reported(tmp_path, monkeypatch):
    (tmp_path / "rules.toml").write_text(
        'title = "t"\n[allowlist]\nregexes = []\n'
        '[[rules]]\nid = "letters"\ndescription = "d"\nregex = \'\'\'\\bzz\\p{L}{30}\\b\'\'\'\nkeywords = ["zz"]\n'
        '[[rules]]\nid = "ok"\ndescription = "d"\nregex = \'\'\'\\bqq_(?i)[a-z]{30}\\b\'\'\'\nkeywords = ["qq_"]\n')
    monkeypatch.setattr(secret_rules, "RULES_DIR", tmp_path)
    monkeypatch.setitem(RULE_SET, "file", "rules.toml")
    secret_rules.gitleaks_rules.cache_clear()
    try:
        rules = gitleaks_rules()
        assert [r.id for r in rules.rules] == ["ok"] and set(rules.skipped) == {"letters"}
        assert "not convertible" in rules.skipped["letters"]
        assert rule_set_info()["rules_skipped"] == rules.skipped
        assert find_hits("x = 'qq_" + "aB" * 15 + "'")[0].source == "gitleaks:ok"
    finally:
        monkeypatch.undo()
        secret_rules.gitleaks_rules.cache_clear()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_found_bare_by_its_gitleaks_rule(family):
    value, rule_id, _ = FAMILIES[family]
    text = f'print("{value}")\n'
    found = gitleaks_hits(text, gitleaks_rules().words.find(lowercase(text)), None)
    assert any(h.source == f"gitleaks:{rule_id}" and text[h.start:h.end] == value for h in found), found
    out, _ = redact(text)
    assert out == 'print("<SECRET>")\n'


@pytest.mark.parametrize("context", sorted(CONTEXT_TEMPLATES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_redacted_in_each_context(family, context):
    value, _, name = FAMILIES[family]
    line = CONTEXT_TEMPLATES[context].format(name=name, NAME=name.upper(), value=value)
    text = HOST + line + "\n" + HOST
    out, hits = redact(text, path={"env file": ".env", "YAML": "config.yaml"}.get(context, "app.py"))
    assert value not in out
    assert CONTEXT_TEMPLATES[context].format(name=name, NAME=name.upper(), value="<SECRET>") in out
    assert out.count(HOST) == 2 and [h.kind for h in hits] == ["secret"]


# Credentials named by their variable (Hugging Face, Weights & Biases, passwords): found by name
# and shape alone (the W&B key has no format of its own; the HF token here is one letter too long
# for gitleaks' rule).
HF_LONG = "hf_" + rand(string.ascii_letters, 37, 21)
PASSWORD_VALUE = "Xk9#mP2$vLq7"
NAMED = [
    f'HF_TOKEN = "{HF_LONG}"', f'login(token="{HF_LONG}")', f"os.environ['HF_TOKEN'] = '{HF_LONG}'", f"HF_TOKEN={HF_LONG}",
    f"export HF_TOKEN={HF_LONG}", f"hf_token: {HF_LONG}", f'huggingface_hub.login(token="{HF_LONG}", add_to_git_credential=True)',
    f'os.environ["WANDB_API_KEY"] = "{WANDB}"', f'wandb.login(key="{WANDB}")', f"WANDB_API_KEY={WANDB}",
    f"wandb_api_key: '{WANDB}'", f'os.environ.setdefault("WANDB_API_KEY", "{WANDB}")', f'WANDB_API_KEY: str = "{WANDB}"',
    f'requests.get("https://api.wandb.ai/graphql?api_key={WANDB}&q=1")', f'headers = {{"Authorization": "Bearer {WANDB}"}}',
    f'DATABASES = {{"default": {{"USER": "app", "PASSWORD": "{PASSWORD_VALUE}"}}}}', f"DB_PASSWORD={PASSWORD_VALUE}",
    f"  password: {PASSWORD_VALUE}", f'connect(host="db", password="{PASSWORD_VALUE}")', f'const apiKey = "{WANDB}";',
]
PLACEHOLDERS_KEPT = [
    'HF_TOKEN = "xxx"', 'api_key = "<your key>"', 'API_KEY = "your-api-key"', 'token = os.environ["HF_TOKEN"]',
    "token = None", 'password = ""', 'api_key = "..."', "WANDB_API_KEY=${WANDB_API_KEY}", 'password: "{{ vault_password }}"',
    'token = "YOUR_HF_TOKEN_HERE"', 'key = "sk-..."', 'password = "changeme"', 'wandb.login(key=os.environ["WANDB_KEY"])',
    'login(token=token)', "HF_TOKEN=", "password: ********", 'sort_key = "user_profile_v2_1234"', 'key = "Europe/Dublin"',
    'cache_key = f"user:{uid}"', "token = tokenizer.eos_token", 'pad_token = "<|endoftext|>"', "api_key = get_key()",
    "from transformers import AutoTokenizer, Qwen2ForCausalLM", '("sapiens2", "Sapiens2ForPoseEstimation"),',
    "RegEnumKey = win32api.RegEnumKey", 'tokens = ["__gnuc_va_list", "AES_KEY", "PKCS7_ISSUER_AND_SERIAL"]',
    'url = "postgres://user:pass@localhost:5432/db"', 'proxy = "socks5h://<username>:<password>@proxy-host"',
    "password = r'([a-f0-9]{48}(?![a-f0-9]))'", 'verify_token="eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9..."',
]


@pytest.mark.parametrize("line", NAMED)
def test_credentials_named_by_their_variable_are_redacted(line):
    value = next(v for v in (HF_LONG, WANDB, PASSWORD_VALUE) if v in line)
    text = HOST + line + "\n"
    own = credential_hits(text, lowercase(text), gitleaks_rules().words.find(lowercase(text)))
    assert [text[h.start:h.end] for h in own] == [value], own  # the by-name rule alone finds it
    out, _ = redact(text)
    assert value not in out and line.replace(value, "<SECRET>") in out


@pytest.mark.parametrize("line", ["AWSKEY={v}", "awskey: {v}", 'u = "https://s3.acme-widgets.io/?awskey={v}&page=2"'])
def test_an_aws_secret_key_named_awskey_is_found_by_its_name(line):
    # Unquoted and starting with '+' or '/': gitleaks' generic rule and detect-secrets' AWS plugin miss it.
    for value in ("+" + rand(ALNUM + "+/", 39, 41), "/" + rand(ALNUM + "+/", 39, 42)):
        text = HOST + line.format(v=value) + "\n"
        own = credential_hits(text, lowercase(text), gitleaks_rules().words.find(lowercase(text)))
        assert [text[h.start:h.end] for h in own] == [value]
        assert redact(text)[0] == HOST + line.format(v="<SECRET>") + "\n"


@pytest.mark.parametrize("line", PLACEHOLDERS_KEPT)
def test_placeholders_and_code_stay_untouched(line):
    text = HOST + line + "\n"
    out, hits = redact(text, path="app.py")
    assert out == text and hits == [], [(h.source, text[h.start:h.end]) for h in hits]


def test_path_bound_rules_run_on_their_files_only():
    yaml = ("apiVersion: v1\nkind: Secret\nmetadata:\n  name: app\ntype: Opaque\ndata:\n"
            f"  api-token: {rand(ALNUM, 30, 22)}==\n")
    assert any(h.source == "gitleaks:kubernetes-secret-yaml" for h in find_hits(yaml, path="deploy/secret.yaml"))
    assert not any(h.source == "gitleaks:kubernetes-secret-yaml" for h in find_hits(yaml, path="notes.txt"))
    assert not any(h.source == "gitleaks:kubernetes-secret-yaml" for h in find_hits(yaml))


def test_a_plugin_group_is_not_redacted_all_over_the_line():
    # detect-secrets' GitHub plugin yields its pattern's group ("ghp"), not the token.
    line = f'TOKEN = "{GITHUB}"  # ghp tokens start with ghp\n'
    out, hits = redact(line)
    assert out == 'TOKEN = "<SECRET>"  # ghp tokens start with ghp\n' and len(hits) == 1


def test_the_artifactory_plugin_sees_url_query_values_and_keeps_the_delimiters():
    """detect-secrets' Artifactory patterns end a token only at whitespace, '"' or the line's end and
    report it with the '=' and quotes around it; ours also end it at a URL's '&' or '#' and report the
    token alone. Elsewhere they find the same tokens."""
    from detect_secrets.plugins.artifactory import ArtifactoryDetector

    # The patterns DENYLIST_OVERRIDES copies: a detect-secrets that changes them needs a new look.
    assert [r.pattern for r in ArtifactoryDetector.denylist] == [
        r'(?:\s|=|:|"|^)AKC[a-zA-Z0-9]{10,}(?:\s|"|$)', r'(?:\s|=|:|"|^)AP[\dABCDEF][a-zA-Z0-9]{8,}(?:\s|"|$)']
    shipped = ArtifactoryDetector()
    for token in ("AKCp8" + rand(ALNUM, 20, 31), "AP6" + rand(ALNUM, 14, 32)):
        for line in (f'URL = "https://repo.acme-widgets.io/api?api_key={token}&page=2"',
                     f"see https://repo.acme-widgets.io/api?key={token}#section", f'TOKEN = "{token}"',
                     f"ARTIFACTORY_PASSWORD={token}", f"password: {token}", f'conf = {{"key":"{token}"}}'):
            hits = redaction._detect_secrets_hits(line + "\n")
            assert [(line[h.start:h.end], h.source) for h in hits] == [
                (token, "detect-secrets:Artifactory Credentials")]
            if "?" not in line:  # where detect-secrets' own patterns end the token, they find it too
                assert [v.strip(' =:"\n') for v in shipped.analyze_string(line + "\n")] == [token]
        assert redact(f'TOKEN = "{token}"\n')[0] == 'TOKEN = "<SECRET>"\n'


def test_detect_secrets_gate_finds_what_every_line_does():
    """The plugins run on the lines holding one of their patterns' literals: the same findings as on
    every line (compared on planted secrets and on real standard-library files)."""
    from megatron_seed.data.stdlib_corpus import stdlib_files

    def every_line(text):
        hits, offset = set(), 0
        for line in text.splitlines(keepends=True):
            for plugin in redaction.detect_secrets_plugins():
                for value in set(plugin.analyze_string(line)):
                    value = value.strip()
                    if len(value) < 6 and plugin.secret_type != "Basic Auth Credentials":
                        continue
                    if value and not (plugin.secret_type == "Basic Auth Credentials" and (
                            secret_rules.PLACEHOLDER.search(value) or value.lower() in ("pass", "pw", "pwd"))):
                        pattern = (r"(?<=:)" + re.escape(value) + r"(?=@)" if plugin.secret_type == "Basic Auth Credentials"
                                   else re.escape(value))
                        hits |= {(offset + m.start(), offset + m.end(), plugin.secret_type)
                                 for m in re.finditer(pattern, line)}
            offset += len(line)
        return hits

    texts = [t for t, _ in PLANTED.values()] + [f"{v}\n" for v, _, _ in FAMILIES.values()]
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(include_tests=True)[::97]]
    texts += ['x = "http://admin:Tr0ub4dor3x@db"\nAccountKey=' + rand(ALNUM, 88, 23) + "\n"]
    total = 0
    for text in texts:
        gated = {(h.start, h.end, h.source.split(":", 1)[1]) for h in redaction._detect_secrets_hits(text)}
        assert gated == every_line(text)
        total += len(gated)
    assert total >= 10


def test_curate_keeps_the_redacted_file_and_records_the_rule_set(tmp_path):
    """Through curate's own pieces: its reader on a repository tree, the file filters, the
    redaction step in a datatrove executor, and its stats.json writer."""
    from datatrove.pipeline.writers import JsonlWriter

    from datatrove_pipelines import curate
    from datatrove_pipelines.filters import CodeFileFilter

    repo = tmp_path / "corpus" / "repo_secrets"
    repo.mkdir(parents=True)
    train = ("import os\n\nimport wandb\nfrom huggingface_hub import login\n\n"
             f'os.environ["WANDB_API_KEY"] = "{WANDB}"\nHF_TOKEN = "{HF_TOKEN}"\n\n\n'
             "def setup(run_name):\n    \"\"\"Log in to the Hub and to W&B before training.\"\"\"\n"
             "    login(token=HF_TOKEN)\n    wandb.login(key=os.environ[\"WANDB_API_KEY\"])\n"
             '    api_key = "<your key>"\n    return wandb.init(project="demo", name=run_name)\n')
    (repo / "train.py").write_text(train)
    (repo / "config.yaml").write_text(f"model: smollm2\nhf_token: {HF_LONG}\nwandb_api_key: your-api-key\nepochs: 3\n")
    out = tmp_path / "out"
    pipeline = [curate.reader_for(str(tmp_path / "corpus")), CodeFileFilter(), SecretRedactor(),
                JsonlWriter(str(out / "stages" / "1_filtered"), compression=None)]
    curate.make_executor("local", pipeline, 1, 1, str(out / "logs" / "filter")).run()
    docs = {}
    for path in (out / "stages" / "1_filtered").glob("*.jsonl"):
        docs |= {d["id"]: d for d in map(json.loads, path.read_text().splitlines())}
    assert set(docs) == {"repo_secrets/train.py", "repo_secrets/config.yaml"}  # redacted, not dropped
    text = docs["repo_secrets/train.py"]["text"]
    assert WANDB not in text and HF_TOKEN not in text
    assert text == train.replace(WANDB, "<SECRET>").replace(HF_TOKEN, "<SECRET>")  # placeholders untouched
    assert docs["repo_secrets/train.py"]["metadata"]["redacted_secret"] == 2
    assert docs["repo_secrets/config.yaml"]["text"].splitlines()[1:3] == ["hf_token: <SECRET>", "wandb_api_key: your-api-key"]
    stats = curate.write_stats(str(out), Namespace(scorer=None, drop_fraction=0.1, redact=True))
    assert stats["redacted"]["redacted_secret"] == 3 and stats["redacted"]["redacted_files"] == 2
    assert stats["redaction_rules"]["name"] == "gitleaks" and stats["redaction_rules"]["version"] == RULE_SET["version"]
    assert stats["redaction_rules"]["rules_used"] == 221 and sum(stats["redacted_by_rule"].values()) == 3
    assert stats["redacted_by_rule"]["gitleaks:huggingface-access-token"] == 1
    assert json.loads((out / "stats.json").read_text())["redaction_rules"]["version"] == RULE_SET["version"]
