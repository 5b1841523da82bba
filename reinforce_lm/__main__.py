"""`python -m reinforce_lm ...` (and `torchrun -m reinforce_lm ...`) runs the CLI."""

from reinforce_lm.cli import main

if __name__ == "__main__":
    main()
