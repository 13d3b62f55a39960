import pytest

from helpers import run_pretrain

from megatron_seed.config import ConfigError, load_config, run_preset
from megatron_seed.training.objective import CONFIG_CHECKS


def test_overrides_are_typed():
    c = load_config(overrides=["train.steps=3", "optimizer.lr=3e-4", "data.blend=[a,b]",
                               "parallel.virtual_pipeline=null", "train.precision=fp32"])
    assert (c.train.steps, c.optimizer.lr, c.data.blend, c.train.precision) == (3, 3e-4, ["a", "b"], "fp32")


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=abc", "train.steps='abc' does not fit"),
    ("train.precision=fp16", "train.precision='fp16' does not fit"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("dpo.loss_type=kto", "dpo.loss_type='kto' does not fit"),
    ("dpo.betta=0.2", "unknown config key 'dpo.betta'"),
    ("ref.mode=cached", "ref.mode='cached' does not fit"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(overrides=[override])


@pytest.mark.parametrize("changes,world,message", [
    ({"parallel.tensor": 3}, 3, "num_attention_heads \\(4\\) must be divisible by parallel.tensor \\(3\\)"),
    ({"parallel.tensor": 2}, 3, "world size 3 is not divisible"),
    ({"parallel.pipeline": 2, "parallel.virtual_pipeline": 2}, 2, "num_layers \\(2\\) must be divisible"),
    ({"train.global_batch_size": 5}, 1, "global_batch_size \\(5\\) must be divisible"),
    ({"parallel.sequence_parallel": True}, 1, "sequence_parallel needs parallel.tensor > 1"),
    ({"data.mock": False, "data.blend": []}, 1, "data.blend is empty"),
    ({"data.mock": False, "data.blend": ["/no/such/prefix"]}, 1, "/no/such/prefix.bin does not exist"),
    ({"optimizer.schedule": "wsd"}, 1, "wsd_decay_steps"),
    ({"dpo.beta": 0.0}, 1, "dpo.beta must be a finite number > 0"),
    ({"dpo.beta": float("nan")}, 1, "dpo.beta must be a finite number > 0"),
    ({"dpo.loss_type": "kto"}, 1, "dpo.loss_type must be one of sigmoid, robust, ipo, hinge"),
    ({"dpo.label_smoothing": 0.5}, 1, "dpo.label_smoothing must be in \\[0, 0.5\\)"),
    ({"dpo.label_smoothing": -0.1}, 1, "dpo.label_smoothing must be in"),
    ({"dpo.label_smoothing": 0.1, "dpo.loss_type": "ipo"}, 1,
     "dpo.label_smoothing applies to dpo.loss_type sigmoid and robust only"),
    ({"dpo.sft_weight": -1.0}, 1, "dpo.sft_weight must be a finite number >= 0"),
    ({"ref.mode": "cached"}, 1, "ref.mode must be 'precomputed' or 'live'"),
    ({"ref.load": None}, 1, "ref.load must be a checkpoint directory or empty"),
    # context parallelism: layouts it cannot run
    ({"parallel.context": 2}, 3, "not divisible by parallel.tensor x parallel.pipeline x parallel.context"),
    ({"parallel.context": 0}, 1, "parallel.context must be >= 1"),
    ({"parallel.context": 4, "data.seq_length": 60}, 4, "data.seq_length \\(60\\) must be divisible by 8"),
    ({"parallel.context": 2, "train.objective": "dpo"}, 2, "supports train.objective=pretrain and sft"),
    ({"parallel.context": 2, "model.attention_backend": "megatron"}, 2, "model.attention_backend=megatron"),
    ({"parallel.context": 2, "train.global_batch_size": 2}, 4, "train.global_batch_size \\(2\\) must be divisible"),
    ({"data.packed_format": "thd", "parallel.context": 2}, 2, "data.packed_format=thd is not supported with parallel.context"),
    ({"data.packed_format": "thd", "parallel.pipeline": 2, "train.micro_batch_size": 2}, 2,
     "data.packed_format=thd with parallel.pipeline > 1 needs train.micro_batch_size=1"),
    ({"data.packed_format": "bshd"}, 1, "data.packed_format must be 'auto', 'mask' or 'thd'"),
])
def test_invalid_configs_fail_with_what_to_change(changes, world, message):
    config = run_preset("tiny")
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    with pytest.raises(ConfigError, match=message):
        config.validate(world, CONFIG_CHECKS)


def test_dpo_and_ref_sections_default_and_override(tmp_path):
    c = load_config()
    assert (c.dpo.beta, c.dpo.loss_type, c.dpo.label_smoothing, c.dpo.sft_weight) == (0.1, "sigmoid", 0.0, 0.0)
    assert (c.ref.load, c.ref.mode) == ("", "precomputed")
    c.validate(1)
    c = load_config(overrides=["dpo.beta=0.2", "ref.mode=live", "dpo.loss_type=robust", "dpo.label_smoothing=0.1",
                               "dpo.sft_weight=1", "ref.load=/ckpt/sft"])
    assert (c.dpo.beta, c.ref.mode, c.dpo.loss_type, c.dpo.label_smoothing) == (0.2, "live", "robust", 0.1)
    assert c.dpo.sft_weight == 1.0 and isinstance(c.dpo.sft_weight, float) and c.ref.load == "/ckpt/sft"
    c.validate(1)
    file = tmp_path / "dpo.yaml"
    file.write_text("dpo:\n  beta: 0.05\n  loss_type: ipo\nref:\n  mode: live\n")
    c = load_config(str(file))
    assert (c.dpo.beta, c.dpo.loss_type, c.ref.mode) == (0.05, "ipo", "live")


def test_cli_reports_config_errors_before_starting(tmp_path):
    proc = run_pretrain(tmp_path, "parallel.tensor=3", check=False)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "parallel.tensor" in proc.stderr


def test_presets_match_published_configs():
    seed = run_preset("seed_coder_8b").model
    assert (seed.num_layers, seed.hidden_size, seed.ffn_hidden_size, seed.num_attention_heads,
            seed.num_query_groups, seed.vocab_size, seed.rotary_base, seed.norm_epsilon,
            seed.tie_embeddings) == (32, 4096, 14336, 32, 8, 155136, 500000.0, 1e-6, False)
    assert 8.1e9 < seed.num_parameters() < 8.3e9  # "8.2B"
    smol = run_preset("smollm2_135m").model
    assert (smol.num_layers, smol.hidden_size, smol.ffn_hidden_size, smol.num_attention_heads,
            smol.num_query_groups, smol.vocab_size, smol.rotary_base, smol.norm_epsilon,
            smol.tie_embeddings) == (30, 576, 1536, 9, 3, 49152, 100000.0, 1e-5, True)
    assert abs(smol.num_parameters() - 134.5e6) < 0.1e6
