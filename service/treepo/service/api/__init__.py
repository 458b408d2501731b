"""The HTTP layer: routes, dependencies, middleware and error mapping (no tree logic here)."""
