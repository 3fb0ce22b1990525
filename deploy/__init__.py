"""Deployment helpers: real SuperLink / SuperNodes (see deploy/README.md)."""
