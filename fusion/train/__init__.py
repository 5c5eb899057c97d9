"""Stage 5, training (`fusion train`, `fusion run`): Ray Train workers that read their share
of a prepared (or streamed) data set and step the target on λ·CLM + (1-λ)·fusion loss with
DeepSpeed or DDP, checkpoint, resume exactly and export a HF model. Takes teacher data;
gives a trained target."""
