"""LoRA: pure adapter maths, the ArrayRecord codec, and what a client sends and keeps."""
