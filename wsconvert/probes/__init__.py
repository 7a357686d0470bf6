"""Observations of a model before conversion: convs feeding no norm layer (unnormalized), norm layers that see
one value per channel (pooled)."""
