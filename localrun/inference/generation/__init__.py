"""The generation core: the scheduler of sequences, sampling, speculation, grammars, stops, the prompt cache."""
