"""Plain PyTorch implementations: the fallback backend and the test oracle."""
