"""Secrets and PII redaction (datatrove_pipelines/redaction.py): planted secrets per language,
look-alikes kept, a mostly-secret file dropped, stats and metadata counts."""

from __future__ import annotations

import builtins

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("detect_secrets")

from datatrove.data import Document  # noqa: E402

from datatrove_pipelines import redaction  # noqa: E402
from datatrove_pipelines.redaction import SecretRedactor, find_hits, redact  # noqa: E402

# Made-up values in the real formats (none is a live credential).
AWS_ID = "AKIAQ3EGRTXHZ7LWMN4P"
AWS_SECRET = "q8Zt3Kd9Vx2Lm5Np7Rs1Tu4Wy6Ab0Cd/Ef+GhIjK"
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
