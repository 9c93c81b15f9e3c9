"""Data: the built-in procedural datasets and build_dataset (shapes), LlamaGen pre-extracted code files (codes),
the palette tokenizer and PNG writer (tokenizer)."""
