"""The bottom layer: errors, every key that crosses the wire or names state, the registry type."""
