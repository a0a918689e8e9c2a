"""Preprocessing stages that run before training: videos (or photos) -> aligned face crops."""
