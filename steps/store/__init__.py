"""The content-addressed snapshot store and the manifests that describe what it holds. Imports
nothing else of this project."""
