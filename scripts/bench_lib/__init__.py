"""Helpers of ``scripts/bench``: realistic .vmrs inputs and measured runs (developer tooling)."""
