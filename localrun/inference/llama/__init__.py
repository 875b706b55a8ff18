"""llama.cpp's C API, typed: models, contexts, batches, the log, the build."""
