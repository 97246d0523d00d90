"""Score networks. Importing a network module registers it under its config name."""
