"""Orchestration, part one: what a study is. The spec schema and its loading (spec, yaml_io, convert, grid,
overrides, paths) and the stage graph it expands into (graph). Names no method kind and imports no method code:
the kinds' registry and the checks that need it live in fsdfm.methods (`fsdfm.methods.load`)."""
