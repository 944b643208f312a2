"""`python -m server`: same as the `tuft` console script."""

from server.cli import main

main()
