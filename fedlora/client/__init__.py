"""The client's side of a run: its round as one recipe, its state on disk, device profiles."""
