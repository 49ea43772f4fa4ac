"""Comparing runs: variants of one config at an equal budget (`ablate`), the intervals that
say whether a difference is more than noise (`stats`), and the reports built from run folders
(`report`)."""
