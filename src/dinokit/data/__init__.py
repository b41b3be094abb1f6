"""Images in: finding them, decoding them robustly, and the transforms that feed the models."""
