"""Stage 1, the data: corpora read from local paths or URIs (text, JSONL, Parquet) in
byte-range shards, documents cut into target-token chunks, files written atomically, and
each training worker's share of a prepared data set. Takes paths; gives documents and
chunks."""
