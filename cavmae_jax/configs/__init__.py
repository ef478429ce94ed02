"""The recipes, shipped inside the package: ``--config pretrain:as-base`` names one."""

from cavmae_jax.errors import UserError

MODIFIERS = ("tiny",)  # appended to a variant: ``as-base,tiny``


def variant(arg: str | None, default: str) -> tuple[str, list[str]]:
    """``name,modifier,...`` -> (name, modifiers); an unknown modifier is refused, never
    ignored (``as-base,tinyy`` must not start a full-size run)."""
    name, *modifiers = (arg or default).split(",")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown:
        raise UserError(f"unknown modifier(s) {unknown} in {arg!r}; known: {list(MODIFIERS)}")
    return name, modifiers
