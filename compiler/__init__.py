"""The recipe compiler: validate a recipe, measure its data, plan and write a build directory."""
