"""The engine: batched forwards with interventions, and the experiments built on them."""
