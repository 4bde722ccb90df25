"""What every part of the project shares and that belongs to none of them: the config loader (config.py)."""
