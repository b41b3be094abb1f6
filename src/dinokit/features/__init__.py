"""Using the features: batch extraction (and, on top of it, retrieval and visual tools)."""
