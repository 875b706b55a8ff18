"""Running a model: llama.cpp's C API, the self-test, the engine that streams events, chat templates."""
