"""Score networks (importing a network module registers it under its config name), the model
registry and score-function wrapper (`models.utils`), the EMA (`models.ema`) and the checkpoint
format (`models.checkpoints`)."""
