"""Training: optimizer and schedules, jitted steps, the pretraining loop."""
