"""Tasks: one folder each with its data, reward and metrics; the engine knows none of them. ``concepts``: the concept
word lists and matching that the quickstart and CommonGen share."""
