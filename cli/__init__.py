"""The `modification` command line: `main.py` builds the parser from one small module per command (`COMMANDS` in
`commands.py`); `options.py` derives each step's flags and `--config` from its settings dataclass. The commands only
parse and print: the work is done by library functions users can import, each taking its settings object
(`convert_checkpoint`, `fit_checkpoint`, `train`, `calibrate_checkpoint`, `evaluate_checkpoint`,
`benchmark_checkpoint`, `write_card`, `push_checkpoint`)."""
