"""Hugging Face Space entry point: the explorer app, unchanged (host and port from the environment)."""
from explorer.app import launch

if __name__ == "__main__":
    launch()
