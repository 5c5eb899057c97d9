"""Stage 2, the models: local HF folders and GGUF files loaded safely (tokenizers, causal
LMs, their BOS and vocabularies), the chunked output head, device and dtype policy,
placement on GPUs, and bits-per-byte scoring. Takes a model config; gives a loaded model
and tokenizer."""
