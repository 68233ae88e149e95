"""HTTP routes, one module per resource; each handler parses, calls a domain function and
shapes the answer."""
