"""The doors: one module per op with input checks, ``torch.ops.mirai`` registration of each face (fake kernel,
autograd) and the public function that picks the face."""
