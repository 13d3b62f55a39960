"""The sandbox run from a Python interpreter that lives in a virtual environment under a hidden
directory (/tmp here, /home on most machines). The mount namespace hides /tmp, so unless the
interpreter's prefixes and site-packages are bound back, the exec path cannot even start the
interpreter and the fast path cannot import what is installed in the environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import venv

import pytest

from megatron_seed.sandbox.runner import HIDDEN

from helpers import ROOT

# The program run inside the sandbox: imports the package planted in the venv, reports where the
# interpreter lives, and tries a file next to the venv (under the hidden directory, not bound back).
PROGRAM = textwrap.dedent("""
    import json, sys
    import planted_pkg
    SECRET = "SECRET_PATH"
    res = {"value": planted_pkg.VALUE, "file": planted_pkg.__file__, "prefix": sys.prefix,
           "executable": sys.executable}
    try:
        open(SECRET).read()
        res["secret"] = "read"
    except OSError as e:
        res["secret"] = type(e).__name__
    print(json.dumps(res))
""")

# Runs under the venv's interpreter, so the Sandbox's sys.executable (exec path) and its zygote
# (fast path) are that interpreter. The venv has no system site-packages: megatron_seed.sandbox
# needs only the standard library, found through the path inserted here (not bound into runs).
DRIVER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from megatron_seed.sandbox import Limits, Sandbox
    out = {{}}
    for fast in (False, True):
        with Sandbox(max_workers=1, python_fast_path=fast) as box:
            r = box.run({program!r}, limits=Limits(wall_seconds=20, cpu_seconds=10))
            out["fast" if fast else "exec"] = dict(r.to_dict(), zygote=box._zygote is not None)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def hidden_venv():
    """A venv (no pip: nothing is downloaded) under /tmp, which the sandbox hides, with a tiny
    package planted in its own site-packages and a secret file beside it."""
    assert "/tmp" in HIDDEN
    base = tempfile.mkdtemp(prefix="sandbox_venv_", dir="/tmp")
    try:
        env_dir = os.path.join(base, "venv")
        venv.create(env_dir, with_pip=False, symlinks=True)
        python = os.path.join(env_dir, "bin", "python")
        site = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        assert site.startswith(env_dir + "/"), site
        os.makedirs(os.path.join(site, "planted_pkg"))
        with open(os.path.join(site, "planted_pkg", "__init__.py"), "w") as f:
            f.write("VALUE = 42\n")
        secret = os.path.join(base, "secret.txt")
        with open(secret, "w") as f:
            f.write("token")
        yield {"dir": env_dir, "python": python, "site": site, "secret": secret}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_python_programs_run_with_an_interpreter_from_a_hidden_venv(hidden_venv):
    program = PROGRAM.replace("SECRET_PATH", hidden_venv["secret"])
    proc = subprocess.run([hidden_venv["python"], "-I", "-c", DRIVER.format(root=str(ROOT), program=program)],
                          capture_output=True, text=True, timeout=120, cwd="/", check=False,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert results["exec"]["zygote"] is False and results["fast"]["zygote"] is True  # both paths taken
    # Both paths reported together: each fails in its own way without the bind (exec: the
    # interpreter cannot be executed; fast path: the venv's site-packages cannot be read).
    assert {path: r["status"] for path, r in results.items()} == {"exec": "passed", "fast": "passed"}, \
        {path: r["stderr"][-1500:] for path, r in results.items()}
    for path, r in results.items():
        res = json.loads(r["stdout"])
        assert res["value"] == 42, path
        assert res["file"] == os.path.join(hidden_venv["site"], "planted_pkg", "__init__.py"), path
        assert res["prefix"] == hidden_venv["dir"] and res["executable"] == hidden_venv["python"], path
        # Only the interpreter's directories are bound back: the rest of the hidden tree stays hidden.
        assert res["secret"] == "FileNotFoundError", path
