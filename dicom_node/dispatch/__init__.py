"""Dispatch: send derived series to destinations (C-STORE SCU, STOW-RS) with the retry policy."""
