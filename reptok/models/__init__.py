"""The four networks of a RepTok pipeline (one concept per file)."""
