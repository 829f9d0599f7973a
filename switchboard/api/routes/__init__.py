"""REST routes of SPEC section 9, one module per resource."""
