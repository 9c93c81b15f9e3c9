"""Training objectives: next-token loss plus the foresight losses none / mirai-e / mirai-i / mirai-s (foresight)."""
