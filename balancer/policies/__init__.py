"""One module per balancer policy; each registers itself with `@register(name)`."""
