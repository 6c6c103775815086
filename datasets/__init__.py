"""Dataset plugins, installed as ``ltbench.datasets``; each module registers through an entry point."""
