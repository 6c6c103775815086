"""Method plugins, installed as ``ltbench.methods``; each module registers through an entry point."""
