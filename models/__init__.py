"""The model layer: nets/ (networks), data/ (datasets, tokenizer), objectives/ (foresight losses), sampling/
(sampler, speculative decoding), checkpoint.py (the one loader and writer), cli.py (shared flag handling); the
command-line programs are the top-level modules: python -m models.train | sample | evaluate | extract_features |
pretrain_demo."""
