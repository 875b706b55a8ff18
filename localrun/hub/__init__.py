"""The Hugging Face Hub through huggingface_hub: settings, errors, listings, Range reads, downloads."""
