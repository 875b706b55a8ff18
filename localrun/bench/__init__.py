"""Comparing quantizations: each candidate measured in a child process, then ranked."""
