"""Review: a plan held against the recipe's [budget] limits, and the deltas between two plans."""
