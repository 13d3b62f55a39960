"""The CPU thread policy (megatron_seed.platform.cpu_threads): after a gloo all_gather of a large
tensor, no background thread owns an OpenMP team, while the main thread keeps all its threads."""

import json
import subprocess
import sys

import pytest

from megatron_seed.platform.processes import run_process_group
from tests.helpers import subprocess_env

PROBE = r"""
import json, os, socket, sys, threading, time
import torch
torch.set_num_threads(2)
if sys.argv[1] == "policy":
    from megatron_seed.platform.cpu_threads import keep_intra_op_threads_on_main
    applied = keep_intra_op_threads_on_main()
else:
    applied = "off"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
time.sleep(0.2)
before = len(os.listdir("/proc/self/task"))
x = torch.randn(1 << 22)
out = [torch.empty_like(x)]
torch.distributed.all_gather(out, x)  # gloo copies x in one of its worker threads
time.sleep(0.2)
after = len(os.listdir("/proc/self/task"))
seen = {}
def other():
    torch.ones(1 << 20).add_(1)
    seen["other"] = torch.get_num_threads()
t = threading.Thread(target=other); t.start(); t.join()
a = torch.randn(512, 512)
torch.testing.assert_close(a @ a, (a.double() @ a.double()).float(), rtol=1e-4, atol=1e-3)
print(json.dumps({"applied": applied, "new_threads": after - before, "main": torch.get_num_threads(),
                  "other": seen["other"], "equal": bool(torch.equal(out[0], x))}))
torch.distributed.destroy_process_group()
"""


def _probe(mode: str) -> dict:
    proc = run_process_group([sys.executable, "-c", PROBE, mode], env=subprocess_env(), timeout=120,
                             capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_background_threads_make_no_openmp_team_and_main_keeps_its_threads():
    plain = _probe("off")
    # The mechanism the policy exists for: without it, gloo's worker gets a team of its own
    # (one more OpenMP thread in the process).
    assert plain["new_threads"] >= 1, plain
    assert plain["other"] == 2, plain
    fixed = _probe("policy")
    assert fixed["applied"].startswith("main thread 2"), fixed
    assert fixed["new_threads"] == 0, fixed
    assert fixed["main"] == 2 and fixed["other"] == 1, fixed
    assert fixed["equal"], fixed


def test_policy_off_the_main_thread_does_nothing():
    code = ("import threading, torch\n"
            "from megatron_seed.platform.cpu_threads import keep_intra_op_threads_on_main\n"
            "torch.set_num_threads(2)\n"
            "r = {}\n"
            "t = threading.Thread(target=lambda: r.update(msg=keep_intra_op_threads_on_main()))\n"
            "t.start(); t.join()\n"
            "print(r['msg'], torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "not applied: not called from the main thread 2"
