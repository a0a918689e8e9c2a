"""Data: image index and splits, loaders, video clips, the demo set."""
