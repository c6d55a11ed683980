"""Deployment: the base images' pins and tags (images.py), Kubernetes manifests, a scheduled CI
workflow."""
