"""Recipes: end-to-end jobs (training, ...) that pick components and own their loop."""
