"""Comparing runs: variants of one config at an equal budget (`spec`, `plan`, `ablate`), the
intervals that say whether a difference is more than noise (`stats`), and the reports built from run
folders (`report`, joining `folders`, `summary`, `render` and `figures`)."""
