"""The live web page: ``agentstream ui`` (server, queries, static files)."""
