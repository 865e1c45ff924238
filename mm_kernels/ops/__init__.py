"""Public functional ops: input checks, torch.library custom ops (schema, fake impl, autograd)."""
