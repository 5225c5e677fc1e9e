"""trim."""
