"""Model backends that turn token sequences into per-position top-k logits."""
