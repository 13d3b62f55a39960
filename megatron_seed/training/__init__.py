"""Pretraining: assembly from a config, the training loop, checkpoints, metrics."""
