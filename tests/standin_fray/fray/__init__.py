"""Stand-in for Marin's fray (test double; see ../README.md)."""
