"""`python -m dailyplay` runs the same CLI as the `dailyplay` console script."""

from .cli import main

if __name__ == "__main__":
    main()
