"""Data curation as in the DINOv2 paper: deduplication, embedding clustering, balanced and retrieval-based sampling."""
