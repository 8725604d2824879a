"""Base model -> MoD checkpoint: `convert`, `fit` (cheap routers), `train` (routers, LoRA or all weights), `calibrate`
(a compute budget), the options they take (`settings`), and what they share (data, texts, checkpoints, results)."""
