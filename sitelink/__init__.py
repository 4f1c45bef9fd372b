"""isocam sitelink."""
