"""Evaluations of a trained model (memory at test time: repeat after a gap, pass-key retrieval, bits per byte)."""
