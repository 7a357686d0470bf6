"""Weight Standardization itself: the math and parametrization (standardize), the one "carries WS" predicate
(detect), Adaptive WS gain/shift (adaptive), the eval cache (cached_weight), recompute-in-backward (recompute),
state-dict compatibility hooks (compat), FSDP2 detection (fsdp) and baking one conv (bake)."""
