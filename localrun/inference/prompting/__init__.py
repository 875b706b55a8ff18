"""Prompts and replies: chat templates rendered in a sandbox, tool messages shaped for them, and the reply parser over the reasoning and tool-call families."""
