"""Normalization layers wsconvert adds: Batch-Channel Normalization and estimated BatchNorm (bcn)."""
