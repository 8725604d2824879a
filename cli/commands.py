"""The `modification` commands: the module of `modification.cli` that defines each. A step's module names its
settings dataclass (`SETTINGS`) and has `run(settings)`; the others (`demo`, `fetch-*`, `release`) have
`add_arguments(parser)` and `run(args)`. Every module has its `HELP` line and imports nothing heavy until `run`."""

COMMANDS = {
    "convert": "convert",
    "fit": "fit",
    "train": "train",
    "calibrate": "calibrate",
    "chat-data": "chat_data",
    "eval": "eval",
    "bench": "bench",
    "show-routing": "show_routing",
    "demo": "demo",
    "fetch-base": "fetch_base",
    "fetch-corpus": "fetch_corpus",
    "card": "card",
    "push": "push",
    "release": "release",
}
