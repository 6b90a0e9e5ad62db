"""Scoring trained runs: metrics, the eval command's library, pictures, classification and generation."""
