"""HTTP layer: OpenAI-compatible routes, admin routes, protocol models, serving logic."""
