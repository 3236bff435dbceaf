"""The server's side of a run: the federation loop and its components."""
