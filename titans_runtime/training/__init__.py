"""Training: configs as data, corpora + synthetic long-range data, the TBPTT loop, checkpoints."""
