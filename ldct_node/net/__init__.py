"""The network, its weights and inference."""
