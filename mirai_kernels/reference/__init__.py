"""Plain-PyTorch references: the specification every fast face is tested against."""
