"""Tasks: one folder each with its data, reward and metrics; the engine knows none of them."""
