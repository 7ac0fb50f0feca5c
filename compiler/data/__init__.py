"""Data: fetch pinned assets, read and check rows, template, tokenize and fit them to the token budget."""
