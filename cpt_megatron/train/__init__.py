"""Training: engine (one step on megatron-core), driver, schedule, EWC, signals, metrics."""
