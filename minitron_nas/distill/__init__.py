"""Distillation: losses, training signals, the teacher's cached logits, the trainer, checkpoints, the final stage."""
