"""Typed configuration: the schemas behind conf/ and the one compose/validate point. Imports only
steps.errors."""
