"""One module per engine-level scheduling policy; each registers itself with `@register(name)`."""
