"""The pieces of :mod:`xpoptim.adapters.array`, one concern per module (the public names live there)."""
