"""Control code of each cube type."""
