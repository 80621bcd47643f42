"""Recipes: the YAML schema and how files and overrides become a validated Recipe."""

from wftool.recipe.load import bundled_recipes, load_recipe
from wftool.recipe.schema import STAGES, Recipe

__all__ = ["STAGES", "Recipe", "bundled_recipes", "load_recipe"]
