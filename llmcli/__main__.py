"""`python -m llmcli` entry point."""

from llmcli.cli import main

if __name__ == "__main__":
    main()
