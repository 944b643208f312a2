"""HTTP routes of the Tinker API, one module per area."""
