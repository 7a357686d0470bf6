"""Checkpoint files: the safe reader (reader, archive), the architecture lookup (arch), the rewrite the CLI runs
(rewrite) and whole pickled models (wholemodel). Imported only by the CLI and wsconvert.load."""
