"""The sections of a recipe, one module per concern. `compiler.loading.recipe.Recipe` assembles them."""
