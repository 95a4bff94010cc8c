"""The code of user commands in ``tools/`` (variant comparison, class-agnostic AP),
importable so that the commands and the tests share it; ``tools/<name>.py`` runs ``main()``."""
