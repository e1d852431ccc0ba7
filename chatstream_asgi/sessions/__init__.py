"""Sessions: the signed cookie, the history stores, per-session state."""
