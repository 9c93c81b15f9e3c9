"""Plain-PyTorch references: the specification every fast backend is tested against."""
