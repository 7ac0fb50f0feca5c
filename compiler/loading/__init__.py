"""Loading: read a recipe file (TOML or JSON), apply `--set` overrides, validate it into a frozen `Recipe`."""
