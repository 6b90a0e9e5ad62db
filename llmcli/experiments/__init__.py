"""Orchestrators above the engine: sweeps, leave-one-domain-out table and selection, reproduce, compress."""
