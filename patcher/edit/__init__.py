"""Edits: directions, planning, applying, extraction, and diffs between checkpoints."""
