"""What a model is: references, quant names, GGUF headers (parsed, interpreted, validated), files on disk."""
