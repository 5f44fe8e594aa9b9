"""The premise diagnostic (`fedalign-dist diagnose`)."""
