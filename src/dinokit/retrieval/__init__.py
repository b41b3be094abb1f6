"""Image retrieval: a faiss index over `dinokit embed` output, searched with query images."""
