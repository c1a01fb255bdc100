"""`specmoe serve`: an OpenAI-compatible HTTP server for one offloaded model (protocol, worker, server, cli)."""
