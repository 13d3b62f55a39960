"""Training: the one loop (trainer), its objectives (pretrain, SFT, DPO, RL), assembly from a config,
staged runs, metrics."""
