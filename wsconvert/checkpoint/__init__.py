"""Checkpoint files: the safe reader (reader, archive), checkpoint layouts as registered handlers (layouts), the
architecture lookup (arch), the rewrite the CLI runs behind one write path (rewrite) and whole pickled models
(wholemodel). Imported only by the CLI and wsconvert.load."""
