"""What keeps llama.cpp from taking the process down: the build's self-test, its probe, the file checks."""
