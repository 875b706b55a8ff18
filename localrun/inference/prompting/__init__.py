"""Prompts: chat templates, rendered in a sandbox."""
