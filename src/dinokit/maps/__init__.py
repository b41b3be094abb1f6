"""What patch features show: attention, PCA colours, patch similarity, reference-mask segmentation (PNG and arrays)."""
