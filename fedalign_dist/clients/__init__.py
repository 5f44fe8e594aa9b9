"""Per-client state and the local trainer."""
