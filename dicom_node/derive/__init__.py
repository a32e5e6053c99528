"""Derive: the new DERIVED CT series that references its source and names the model."""
