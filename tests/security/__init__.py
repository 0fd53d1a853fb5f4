"""Attacks from the security review, reproduced against the real site agent and shown to fail."""
