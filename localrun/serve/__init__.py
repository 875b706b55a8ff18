"""`localrun serve`: an OpenAI-compatible HTTP server whose parallel slots share one llama.cpp
context, batched into the same decode (continuous batching)."""
