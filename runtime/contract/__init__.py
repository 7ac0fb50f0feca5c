"""The contract between compiler and runtime: the one part of the runtime the compiler imports.

Standard library and pydantic only (no torch). `config` is the runtime config (`runtime.json`),
`layout` every build-directory file name, `steps` the step count both sides use, `files` atomic
writes and locks, `assets` the read-only asset cache, `paths` where the bundled data lives,
`artifacts` the typed, versioned files a run reads and writes besides runtime.json.
"""
