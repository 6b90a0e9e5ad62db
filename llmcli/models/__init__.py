"""Backbones and the two-headed model around them."""
