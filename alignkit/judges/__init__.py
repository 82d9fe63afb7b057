"""Generative judges: templates, verdict parsing, and local or HTTP backends."""
