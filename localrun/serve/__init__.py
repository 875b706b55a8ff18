"""`localrun serve`: an HTTP server of OpenAI's, Anthropic's and Ollama's APIs whose parallel slots share one llama.cpp
context, batched into the same decode (continuous batching)."""
