"""Pipelines over the layers below: recipes and the demo."""
