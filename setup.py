"""Packaging beyond pyproject.toml: the wheel carries the repository's top-level recipes/ as the package data
smarttrim_cli/recipe_files/ (pyproject.toml cannot list discovered packages together with a mapped one)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["smarttrim_cli", "smarttrim_cli.*"]) + ["smarttrim_cli.recipe_files"],
    package_dir={"smarttrim_cli.recipe_files": "recipes"},
    package_data={"smarttrim_cli.recipe_files": ["*.yaml"]},
)
