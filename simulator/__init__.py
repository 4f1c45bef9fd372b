"""isocam simulator."""
