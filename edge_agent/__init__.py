"""isocam edge_agent."""
