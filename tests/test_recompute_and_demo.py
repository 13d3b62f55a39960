import json

import pytest

from helpers import ROOT, subprocess_env, assert_losses_close, losses, run_pretrain


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_recompute_does_not_change_losses(tmp_path, mode):
    run_pretrain(tmp_path / "plain", "train.steps=3", "train.precision=fp32")
    run_pretrain(tmp_path / mode, "train.steps=3", "train.precision=fp32", f"train.recompute={mode}")
    assert_losses_close(losses(tmp_path / mode), losses(tmp_path / "plain"), atol=1e-6)


def test_demo_trains_on_the_standard_library(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "megatron_seed.demo", "--out", str(out), "--max-files", "60",
                           "train.steps=20", "train.tensorboard=false"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "standard-library files" in proc.stderr
    assert (out / "data" / "stdlib_text_document.bin").stat().st_size > 100_000
    got = losses(out)
    assert got[20] < got[5] - 0.5  # real code is learnable: the byte-level loss falls fast
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    assert "validation loss" in proc.stderr
    # Pipeline stages that ran: tokenizer training, FIM preprocessing with counts, HF export.
    summary = json.loads((out / "data" / "stdlib_summary.json").read_text())
    assert summary["records_in"] == summary["written"] + sum(summary["skipped"].values()) >= 59
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert "5/6 export" in proc.stderr and (out / "hf" / "model.safetensors").exists()
    assert proc.stdout.startswith("def main(argv=None):")
    assert "6/6 evaluate" in proc.stderr and "pass@1" in proc.stderr
    samples = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(isinstance(s["completion"], str) for s in samples)
