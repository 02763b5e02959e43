"""agentstream pipeline package."""
