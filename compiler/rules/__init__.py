"""Rules: the cross-field checks of `recipe validate` (entry point: `compiler.rules.validate`)."""
