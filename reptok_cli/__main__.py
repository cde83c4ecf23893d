"""``python -m reptok_cli`` (what ``torchrun -m reptok_cli ...`` runs)."""

from .app import main

if __name__ == "__main__":
    main()
