"""Networks: the LlamaGen GPT (gpt), the LlamaGen VQ-16 tokenizer (vq), DINOv2 (dinov2), the built-in Mirai-I
token encoder (encoder) and the evaluation classifier (classifier)."""
