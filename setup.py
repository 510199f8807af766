"""A shim for tools and habits that run ``setup.py``: every piece of metadata lives in pyproject.toml.

``pip install .`` reads pyproject.toml with or without this file; ``python setup.py ...`` ends up at the same place.
"""
from setuptools import setup

setup()
