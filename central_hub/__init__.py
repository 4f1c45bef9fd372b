"""isocam central_hub."""
