"""Stage 4, the teacher data (`fusion prepare`): the Ray Data pipeline that runs the target
and the sources over every chunk (backends), aligns and fuses their top-k (MinCE, AvgCE),
counts diagnostics and commits parts; the data-set contract (schema, fingerprint,
manifest), re-fusing, inspecting and estimating. Takes a config; gives a prepared data set."""
