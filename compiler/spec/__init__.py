"""The sections of a recipe, one module per concern. `compiler.recipe.Recipe` assembles them."""
