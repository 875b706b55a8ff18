"""One module per command: compute a result, then render it. Only this layer (and output) prints."""
