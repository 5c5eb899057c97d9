"""Stage 6, evaluation (`fusion eval`): bits per byte of models and ensembles on held-out
corpora, and the weight merges of same-architecture models that fusion is measured against.
Takes model folders; gives a report."""
