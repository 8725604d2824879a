"""The `modification` commands and the module of `modification.cli` that defines each (`register(sub)` adds its
parser, whose `func` runs it). Data only, so that what runs commands (release, demo) can list them without importing
the command line."""

COMMANDS = {
    "convert": "convert",
    "fit": "fit",
    "train": "train",
    "calibrate": "calibrate",
    "eval": "eval",
    "bench": "bench",
    "show-routing": "show_routing",
    "demo": "demo",
    "fetch-base": "fetch",
    "fetch-corpus": "fetch",
    "card": "card",
    "push": "push",
    "release": "release",
}
