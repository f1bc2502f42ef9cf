"""Experiments on frozen-backbone features, described by a YAML file (configs/experiments/*.yaml) and run
outside the library's core by tools/reproduce.py: `spec` (the file), `methods` (the method-kind registry),
`data` (feature cache and long-tailed splits), `store` (finished results), `runner`, `tables`."""
