"""The HTTP surface: the ASGI app, its gateway middleware and the REST routes of SPEC section 9."""
