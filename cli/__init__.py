"""The `modification` command line: `main.py` builds the parser from one small module per command (`COMMANDS` in
`commands.py`); `options.py` holds the options they share and derives flags from the settings declarations. The
commands only parse and print: the work is done by library functions users can import (`convert_checkpoint`,
`fit_checkpoint`, `train`, `calibrate_checkpoint`, `evaluate_checkpoint`, `benchmark_checkpoint`, ...)."""
