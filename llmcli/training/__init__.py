"""The training engine and what it trains with: objectives, DG methods, task losses, optimisers, signals."""
