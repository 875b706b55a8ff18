"""What is pulled: the Hugging Face cache scanned, the one resolver (reference -> model to load),
removal, and when each model was last used."""
