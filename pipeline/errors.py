class UserError(Exception):
    """A mistake the user can fix (bad param, missing or corrupt file). Stages print it as one line and exit 2."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` with the message's lines joined and cut to `limit` characters (load_state_dict, for one,
    reports each mismatched tensor on its own line)."""
    text = " ".join(str(exc).split()) or "(no message)"
    text = text if len(text) <= limit else text[:limit] + "…"
    return f"{type(exc).__name__}: {text}"
