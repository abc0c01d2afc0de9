"""Orchestration, part one: what a study is. The spec schema and its loading (spec, yaml_io, convert, grid,
overrides, paths) and the stage graph it expands into (graph). Imports no torch-side method code: the method
kinds fill the spec's registries from fsdfm.methods."""
