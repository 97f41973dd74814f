"""Speculative decoding: drafts propose candidate trees, the target verifies them in one pass."""
