class UserError(Exception):
    """A mistake the user can fix (bad param, missing or corrupt file). Stages print it as one line and exit 2."""
